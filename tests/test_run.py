"""train.run.Run: phi of a run read without its task, from every checkpoint format; its refusals.

``tests/data/run_format1`` was written by the trainer of checkpoint format 1 with the flat
optimizer fields config.json had then; a run of today's format is ``tests/test_export.py``'s.
"""

import os
import shutil

import jax
import numpy as np
import pytest

import learned_opt
import tasks.registry
from train import Run, meta_step, trainer
from train.config import MetaTrainConfig
from train.run import RunDirError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "run_format1")


@pytest.fixture
def old_run(tmp_path):
  shutil.copytree(DATA, tmp_path / "run")
  return Run(tmp_path / "run")


def _no_task(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("reading phi built the task")

  monkeypatch.setattr(tasks.registry, "get", refuse)


def _equal(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs)


def test_phi_of_an_old_format_checkpoint_reads_without_the_task(old_run, monkeypatch):
  _no_task(monkeypatch)
  snapshot = old_run.meta_params(4)
  latest = old_run.meta_params("latest")
  monkeypatch.undo()
  assert snapshot.step == latest.step == 4
  assert snapshot.source == old_run.checkpoint_path(4)
  assert snapshot.saved.optimizer.config["hidden_size"] == 6  # the flat fields of format 1
  config = MetaTrainConfig(**old_run.saved_config())
  task, optimizer = trainer.build(config)
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  state, _ = old_run.restore(4, template, meta_step.upgrade_checkpoint)  # the whole state
  assert _equal(snapshot.saved.meta_params, state.meta_params)
  assert _equal(latest.saved.meta_params, state.meta_params)
  grads = {"x": np.ones(3, np.float32)}
  tx = learned_opt.as_optax(snapshot.saved)
  assert np.all(np.isfinite(tx.update(grads, tx.init(grads), grads)[0]["x"]))


def test_the_best_optimizer_and_its_step(old_run, monkeypatch):
  _no_task(monkeypatch)
  best = old_run.meta_params("best")
  assert best.step == 4 and best.source == old_run.path and best.host == {}
  assert _equal(best.saved.meta_params, learned_opt.load(old_run.path).meta_params)


def test_latest_skips_an_unusable_newer_checkpoint_and_says_so(old_run):
  shutil.copytree(old_run.checkpoint_path(4), old_run.checkpoint_path(8))  # step 8 says 4
  logs = []
  assert old_run.meta_params("latest", log=logs.append).step == 4
  assert len(logs) == 1 and "step_00000008" in logs[0] and "Skipping unusable" in logs[0]
  with pytest.raises(ValueError, match="is for step 4, not that of step_00000008"):
    old_run.meta_params(8)


def test_refusals_name_the_problem_and_the_fix(old_run, tmp_path):
  with pytest.raises(RunDirError, match=r"No checkpoint of meta-step 5 .*available steps: 4\."):
    old_run.meta_params(5)
  os.remove(old_run.config_path)
  with pytest.raises(RunDirError, match=r"has checkpoints but no config\.json.*best optimizer"):
    old_run.meta_params("latest")
  with pytest.raises(RunDirError, match=r"has no config\.json; name a meta-training run"):
    old_run.config()
  empty = Run(tmp_path / "empty")
  with pytest.raises(RunDirError, match=r"No checkpoints in .*empty/checkpoints"):
    empty.meta_params("latest")
  with pytest.raises(RunDirError, match=r"No best optimizer saved in .*empty.*'latest'"):
    empty.meta_params("best")


def test_a_config_of_a_newer_library_is_named(old_run):
  with open(old_run.config_path, "w") as f:
    f.write('{"task": "quadratic", "from_the_future": 1}')
  with pytest.raises(RunDirError, match=r"config\.json is not a valid run config.*upgrade"):
    old_run.meta_params(4)


def test_budget_and_metrics(old_run):
  budget = old_run.budget()
  assert budget["meta_steps"] == 4 and budget["saved_step"] == 4
  assert budget["valid_history"] == [pytest.approx(6.179230690002441)]
  assert budget["num_problems"] == 4 and budget["unroll"] == 5 and budget["wall_seconds"] is None
  assert [r["step"] for r in old_run.metrics.records()] == [2, 4, 4]
  assert old_run.metrics.lines() == 3
  assert Run(old_run.path + "_missing").budget()["meta_steps"] == 0  # nothing there yet
