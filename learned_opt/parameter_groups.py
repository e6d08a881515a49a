"""Separate learned optimizers for groups of parameters (section 3.3: conv vs fully connected).

Like ``optax.partition``, a labelling rule assigns every parameter leaf to a group and each group
gets its own optimizer and its own weights phi; coordinates share phi only within their group
(and global averaging cells average only within it). Rules are named so a saved optimizer can be
rebuilt from its JSON config (``learned_opt.build`` rebuilds each group's optimizer).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax

from learned_opt.base import LearnedOptimizer, check_float_params

LabelRule = Callable[[Any, jax.Array], str]  # (key path, leaf) -> group label


def conv_fc(path, leaf) -> str:
  """``"conv"`` for convolution parameters, ``"fc"`` for the rest.

  A leaf is a convolution parameter if a key on its path names a convolution (flax's ``Conv_0``,
  haiku's ``conv2_d``) or, failing names, if it is a kernel of rank 4 or more.
  """
  names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
  if any("conv" in name for name in names) or jax.numpy.ndim(leaf) >= 4:
    return "conv"
  return "fc"


RULES: dict[str, LabelRule] = {"conv_fc": conv_fc}


def group_indices(rule: LabelRule, tree, labels: tuple[str, ...]) -> dict[str, list[int]]:
  """Leaf indices of each group, in flattening order; checks every label is known."""
  groups = {label: [] for label in labels}
  for index, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(tree)):
    label = rule(path, leaf)
    if label not in groups:
      raise ValueError(
        f"Leaf {jax.tree_util.keystr(path)} got label {label!r}, but the partitioned optimizer "
        f"only has optimizers for {labels}."
      )
    groups[label].append(index)
  return groups


def partition(
  optimizers: Mapping[str, LearnedOptimizer], rule: str = "conv_fc"
) -> LearnedOptimizer:
  """One learned optimizer per parameter group; phi is ``{label: phi_label}``.

  Args:
    optimizers: label -> learned optimizer for that group, e.g. ``{"conv": lstm_optimizer(),
      "fc": lstm_optimizer()}``.
    rule: name of the labelling rule in ``RULES``.

  Example:
    >>> opt = partition({"conv": lstm_optimizer(), "fc": lstm_optimizer()})
    >>> tx = learned_opt.as_optax(opt, opt.init_meta_params(jax.random.key(0)))
  """
  if rule not in RULES:
    raise ValueError(f"Unknown labelling rule {rule!r}; known rules: {sorted(RULES)}.")
  if not optimizers:
    raise ValueError("partition needs at least one group optimizer.")
  label_fn, labels = RULES[rule], tuple(sorted(optimizers))
  config = {
    "kind": "partition",
    "rule": rule,
    "optimizers": {label: dict(optimizers[label].config) for label in labels},
  }

  def split(tree):
    leaves = jax.tree.leaves(tree)
    groups = group_indices(label_fn, tree, labels)
    return {label: [leaves[i] for i in groups[label]] for label in labels}, groups

  def init_meta_params(key):
    keys = jax.random.split(key, len(labels))
    return {
      label: optimizers[label].init_meta_params(k) for label, k in zip(labels, keys, strict=True)
    }

  def init_state(meta_params, params):
    check_float_params(params)  # On the whole tree, so an error names the leaf's own path.
    parts, _ = split(params)
    return {
      label: optimizers[label].init_state(meta_params[label], parts[label]) for label in labels
    }

  def update(meta_params, grads, state):
    parts, groups = split(grads)
    leaves, treedef = jax.tree.flatten(grads)
    updates, new_state = list(leaves), {}
    for label in labels:
      group_updates, new_state[label] = optimizers[label].update(
        meta_params[label], parts[label], state[label]
      )
      for i, u in zip(groups[label], group_updates, strict=True):
        updates[i] = u
    return treedef.unflatten(updates), new_state

  return LearnedOptimizer(init_meta_params, init_state, update, config)
