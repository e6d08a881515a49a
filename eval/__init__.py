"""Evaluation: one engine from a spec to curves, and what the curves say.

- ``engine``: ``Spec`` (task, problems, optimizers, tuning, observables, chunks, mesh, cache)
  -> ``run`` -> curves per optimizer; ``curves`` (the vmapped, sharded rollouts over
  ``train.inner``), ``tuning`` (the grid, coarse-to-fine), ``cache`` (the one fingerprinted
  cache), ``baselines`` (the paper's optax baselines and grid), ``sharding`` (the mesh);
- ``report`` (summaries, paired statistics, the verdict, tables, the ranking table) and
  ``plots`` (figures);
- ``compare``, ``evaluate``, ``rank``, ``visualize``: comparisons and their commands.
"""
