"""Readers of run files under hostile file-system states: a FIFO where a file should be never
blocks a reader (it is an unusable file, named), and JSON nested too deeply for the parser is a
clean refusal rather than a RecursionError."""

import json
import os
import threading

import jax
import numpy as np
import pytest

import learned_opt
from learned_opt import tree_files
from train import checkpoint, presets, saved_config
from train.config import MetaTrainConfig
from train.metrics_log import MetricsLog
from train.run import Run, RunDirError

DEEP = "[" * 100000 + "]" * 100000


def promptly(fn, timeout=30.0):
  """``fn()``, or its exception; fails rather than hangs if ``fn`` blocks (say, on a FIFO)."""
  out = {}

  def go():
    try:
      out["value"] = fn()
    except BaseException as e:  # re-raised below, in the test's thread
      out["error"] = e

  thread = threading.Thread(target=go, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), f"{fn} blocked for {timeout} s"
  if "error" in out:
    raise out["error"]
  return out.get("value")


def fifo_at(path):
  if os.path.lexists(path):
    os.remove(path)
  os.mkfifo(path)


def _checkpoints(tmp_path):
  """Two checkpoints (steps 1 and 2) of a small state, and its template."""
  state = {"w": np.arange(3, dtype=np.float32)}
  directory = str(tmp_path / "checkpoints")
  for step in (1, 2):
    checkpoint.save(directory, step, {"w": state["w"] + step}, {"n": step}, keep=2)
  return directory, jax.eval_shape(lambda: state)


@pytest.mark.parametrize("name", ["state.msgpack", "meta.json"])
def test_a_fifo_in_a_checkpoint_makes_it_unusable_not_a_hang(tmp_path, name):
  directory, template = _checkpoints(tmp_path)
  fifo_at(os.path.join(checkpoint.path_of(directory, 2), name))
  with pytest.raises(ValueError, match=rf"step_00000002.*{name} is a FIFO, not a regular file"):
    promptly(lambda: checkpoint.restore(checkpoint.path_of(directory, 2), template))
  found = promptly(lambda: checkpoint.latest(directory, template))
  assert found.step == 1 and found.host == {"n": 1}  # skipped like a corrupt checkpoint
  assert [step for step, _ in found.unusable] == [2] and "FIFO" in found.unusable[0][1]


def test_a_fifo_as_optimizer_json_or_its_weights_is_named(tmp_path):
  opt = learned_opt.build({"kind": "lstm", "hidden_size": 2, "num_layers": 1})
  path = str(tmp_path / "opt")
  learned_opt.save(path, opt, opt.init_meta_params(jax.random.key(0)))
  with open(os.path.join(path, "optimizer.json")) as f:
    weights = os.path.join(path, json.load(f)["weights_file"])
  fifo_at(weights)
  with pytest.raises(ValueError, match=r"meta_params-[0-9a-f]{16}\.msgpack is a FIFO"):
    promptly(lambda: learned_opt.load(path))
  fifo_at(os.path.join(path, "optimizer.json"))
  for read in (learned_opt.load, learned_opt.load_metadata):
    with pytest.raises(ValueError, match=r"optimizer\.json is a FIFO, not a regular file"):
      promptly(lambda read=read: read(path))


def _run_with_checkpoint(tmp_path):
  config = MetaTrainConfig(output_dir=str(tmp_path / "run"))
  run = Run(config.output_dir)
  os.makedirs(run.checkpoint_path(4))  # check_resumable only asks whether one exists
  return config, run.config_path, run


def test_a_fifo_as_config_json_refuses_the_resume(tmp_path):
  config, config_path, run = _run_with_checkpoint(tmp_path)
  fifo_at(config_path)
  with pytest.raises(RunDirError, match=r"config\.json is unreadable .*is a FIFO.*restore"):
    promptly(lambda: run.check_resumable(config))
  with pytest.raises(RunDirError, match=r"config\.json is unreadable .*is a FIFO.*restore"):
    promptly(run.config)
  assert promptly(lambda: saved_config.resume_hint(config)) == ""


def test_a_fifo_as_metrics_jsonl_raises_instead_of_blocking(tmp_path):
  metrics = MetricsLog(str(tmp_path / "metrics.jsonl"))
  fifo_at(metrics.path)
  for read in (metrics.lines, metrics.records, lambda: metrics.rewind(None, 0)):
    with pytest.raises(OSError, match="is a FIFO"):
      promptly(read)


def test_a_deeply_nested_config_json_refuses_the_resume_cleanly(tmp_path):
  config, config_path, run = _run_with_checkpoint(tmp_path)
  with open(config_path, "w") as f:
    f.write(DEEP)
  deep = r"config\.json is unreadable .*nested too deeply.*--output_dir"
  with pytest.raises(RunDirError, match=deep):
    run.check_resumable(config)
  with pytest.raises(RunDirError, match=deep):
    run.meta_params(4)  # reading phi needs the config too
  with pytest.raises(ValueError, match=r"--preset=.*config\.json is nested too deeply"):
    presets.load_file(config_path)


def test_read_regular_reads_files_and_names_what_else_it_found(tmp_path):
  path = tmp_path / "f"
  path.write_bytes(b"abc")
  assert tree_files.read_regular(str(path)) == b"abc"
  with pytest.raises(tree_files.NotRegularFileError, match=r"is a directory, not a regular file"):
    tree_files.read_regular(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    tree_files.read_regular(str(tmp_path / "missing"))
