"""train.export: a tiny quadratic run's checkpoints shipped as saved optimizers; its refusals."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
import tasks.registry
from learned_opt import tree_files
from train import checkpoint, export, meta_step, trainer
from train.config import MetaTrainConfig
from train.run import Run

# Exports a trained run's checkpoints, in-process and on the command line (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny quadratic run: checkpoints at meta-steps 4, 6 and 8 (epochs end at 4, 8)."""
  config = MetaTrainConfig(
    output_dir=str(tmp_path_factory.mktemp("export") / "run"),
    task_kwargs={"dim": 3},
    optimizer_kwargs={"hidden_size": 3},
    unroll=4,
    horizon=8,
    num_problems=2,
    num_epochs=2,
    steps_per_epoch=4,
    valid_problems=2,
    checkpoint_every=2,
    meta_lr=1e-2,
  )
  state, progress = trainer.train(config, log=lambda s: None)
  return config, state, progress


def _ckpt_dir(config) -> str:
  return Run(config.output_dir).checkpoint_dir


def _phi_at(config, step):
  task, optimizer = trainer.build(config)
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  path = checkpoint.path_of(_ckpt_dir(config), step)
  state, _ = checkpoint.restore(path, template, meta_step.upgrade_checkpoint)
  return state.meta_params


def _bitwise_equal(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs)


def test_two_steps_export_the_checkpoints_phi_bit_for_bit(run, tmp_path):
  config, state, progress = run
  assert checkpoint.all_steps(_ckpt_dir(config)) == [4, 6, 8]
  for step in (6, 8):
    out = str(tmp_path / f"step{step}")
    export.export(config.output_dir, out, step=step, log=lambda s: None)
    saved = learned_opt.load(out)
    assert _bitwise_equal(saved.meta_params, _phi_at(config, step))
    metadata = learned_opt.load_metadata(out)
    assert metadata["step"] == step and metadata["epoch"] == step // 4
    assert metadata["exported_from"]["step"] == step
    state_file = os.path.join(checkpoint.path_of(_ckpt_dir(config), step), "state.msgpack")
    with open(state_file, "rb") as f:
      assert metadata["exported_from"]["state_sha256"] == tree_files.sha256(f.read())
    assert metadata["exported_from"]["run_dir"] == os.path.abspath(config.output_dir)
    assert metadata["run_config"] == json.loads(config.to_json())
    assert metadata["task"] == "quadratic"
    grads = {"x": jnp.ones(3)}
    tx = learned_opt.as_optax(saved)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    assert np.all(np.isfinite(updates["x"]))
  assert _bitwise_equal(learned_opt.load(str(tmp_path / "step8")).meta_params, state.meta_params)
  # Step 8 ends the second epoch: its validation is the run's; step 6 was never validated.
  step8 = learned_opt.load_metadata(str(tmp_path / "step8"))
  assert step8["valid_final_loss"] == progress.valid_history[1]
  assert step8["valid_diverged"] == progress.diverged_history[1]
  assert learned_opt.load_metadata(str(tmp_path / "step6"))["valid_final_loss"] is None


def test_phi_reads_and_exports_without_building_the_task(run, tmp_path, monkeypatch):
  """Today's checkpoints: ``Run.meta_params`` is the full state's phi, and no task is built."""
  config, state, _ = run
  expected = {step: _phi_at(config, step) for step in (4, 6, 8)}

  def refuse(*args, **kwargs):
    raise AssertionError("reading phi built the task")

  monkeypatch.setattr(tasks.registry, "get", refuse)
  for step, phi in expected.items():
    assert _bitwise_equal(Run(config.output_dir).meta_params(step).saved.meta_params, phi)
  assert _bitwise_equal(Run(config.output_dir).meta_params().saved.meta_params, state.meta_params)
  export.export(config.output_dir, str(tmp_path / "out"), step=6, log=lambda s: None)
  assert _bitwise_equal(learned_opt.load(str(tmp_path / "out")).meta_params, expected[6])


def test_without_a_step_the_newest_usable_checkpoint_is_exported(run, tmp_path):
  config, _, _ = run
  copy = tmp_path / "run"
  shutil.copytree(config.output_dir, copy)
  newest = os.path.join(Run(copy).checkpoint_path(8), "state.msgpack")
  with open(newest, "r+b") as f:
    f.truncate(os.path.getsize(newest) // 2)
  logs = []
  metadata = export.export(str(copy), str(tmp_path / "out"), log=logs.append)
  assert metadata["step"] == 6  # the truncated step 8 is skipped, as resuming skips it
  assert any("Skipping unusable checkpoint" in line and "step_00000008" in line for line in logs)
  assert os.path.isfile(newest)  # the run is left as it was
  assert _bitwise_equal(learned_opt.load(str(tmp_path / "out")).meta_params, _phi_at(config, 6))


def test_refusals_name_the_problem_and_write_nothing(run, tmp_path):
  config, _, _ = run
  out = str(tmp_path / "out")
  no_checkpoints = tmp_path / "fresh"
  no_checkpoints.mkdir()
  shutil.copy(os.path.join(config.output_dir, "config.json"), no_checkpoints)
  with pytest.raises(export.ExportError, match=r"No checkpoints in .*fresh/checkpoints"):
    export.export(str(no_checkpoints), out)
  with pytest.raises(export.ExportError, match=r"--step=5: .*available steps: 4, 6, 8\."):
    export.export(config.output_dir, out, step=5)
  with pytest.raises(export.ExportError, match="may not replace the training record's fields step"):
    export.export(config.output_dir, out, step=8, extra={"step": 3, "notes": "n"})
  with pytest.raises(export.ExportError, match="is the run directory"):
    export.export(config.output_dir, config.output_dir, step=8, overwrite=True)
  assert not os.path.exists(out)

  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "notes.txt").write_text("keep")
  with pytest.raises(export.ExportError, match=r"already exists and is not empty.*--overwrite"):
    export.export(config.output_dir, str(taken), step=8)
  export.export(config.output_dir, out, step=6, log=lambda s: None)
  export.export(config.output_dir, out, step=8, overwrite=True, log=lambda s: None)
  assert learned_opt.load_metadata(out)["step"] == 8

  # A checkpoint whose phi is NaN (well formed and checksummed): refused, not shipped.
  copy = tmp_path / "run"
  shutil.copytree(config.output_dir, copy)
  task, optimizer = trainer.build(config)
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  ckpt_dir = Run(copy).checkpoint_dir
  state, host = checkpoint.restore(checkpoint.path_of(ckpt_dir, 8), template)
  nan_phi = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.meta_params)
  checkpoint.save(ckpt_dir, 10, state._replace(meta_params=nan_phi), host, keep=10)
  with pytest.raises(export.ExportError, match=r"step_00000010 holds non-finite phi"):
    export.export(str(copy), str(tmp_path / "nan"), step=10)
  assert not os.path.exists(tmp_path / "nan")


def _export_cli(*flags):
  return subprocess.run(
    [sys.executable, "-m", "train.export", *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_the_command_exports_and_refuses_without_a_traceback(run, tmp_path):
  config, _, _ = run
  out = tmp_path / "cli"
  result = _export_cli(
    f"--run_dir={config.output_dir}", f"--output={out}", "--step=4", '--metadata={"notes": "cli"}'
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Exported meta-step 4" in result.stdout
  assert _bitwise_equal(learned_opt.load(str(out)).meta_params, _phi_at(config, 4))
  assert learned_opt.load_metadata(str(out))["notes"] == "cli"  # beside the training record
  again = _export_cli(f"--run_dir={config.output_dir}", f"--output={out}", "--step=4")
  assert again.returncode == 1 and "Traceback" not in again.stderr
  assert "already exists and is not empty" in again.stderr
