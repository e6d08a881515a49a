"""The CIFAR-10 experiment runner on tiny binary batches: rollouts, tuning, statistics, reports."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from cifar10_files import binary_batch_bytes, tiny_split

import learned_opt
import tasks
from eval import curves as curves_lib
from eval import report
from experiments import cifar10_experiments as cx
from tasks.cifar10_formats import BINARY_FILES
from train import inner

TINY = {"channels": [2], "hidden_size": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """Official binary batches with every class in both splits (held-out subsets are not empty)."""
  directory = tmp_path_factory.mktemp("cifar10_bin")
  images, labels = tiny_split(per_class=5)
  order = np.random.default_rng(0).permutation(len(labels))
  for name, part in zip(BINARY_FILES["train"], np.array_split(order, 5), strict=True):
    (directory / name).write_bytes(binary_batch_bytes(images[part], labels[part]))
  images, labels = tiny_split(per_class=2, seed=1)
  (directory / BINARY_FILES["test"][0]).write_bytes(binary_batch_bytes(images, labels))
  return str(directory)


@pytest.fixture(scope="module")
def two_lstms():
  optimizer = learned_opt.build(
    {
      "kind": "partition",
      "rule": "conv_fc",
      "optimizers": {
        g: {"kind": "lstm", "hidden_size": 3, "num_layers": 1, "preprocess": "log_sign"}
        for g in ("conv", "fc")
      },
    }
  )
  return learned_opt.SavedOptimizer(optimizer, optimizer.init_meta_params(jax.random.key(0)))


def test_pairs_every_learned_optimizer_with_every_later_one():
  rng = np.random.default_rng(0)
  names = ["two", "one", "sgd", "adam"]
  curves = {n: cx.Curves(rng.random((4, 101)), rng.random((4, 101))) for n in names}
  results = {
    "num_steps": 100,
    "optimizers": [
      {"name": n, "kind": "learned" if i < 2 else "baseline"} for i, n in enumerate(names)
    ],
  }
  rows = cx.pairs(results, curves)
  paired = report.paired
  assert [(p["learned"], p["other"]) for p in rows] == [
    ("two", "one"),
    ("two", "sgd"),
    ("two", "adam"),
    ("one", "sgd"),
    ("one", "adam"),
  ]
  assert list(rows[0]["train_steps"]) == ["10", "25", "50", "100"]
  assert rows[2]["test_steps"]["25"] == paired(
    curves["two"].test[:, 25], curves["adam"].test[:, 25]
  )
  assert rows[1]["train_run_mean"] == paired(
    curves["two"].train[:, 1:].mean(1), curves["sgd"].train[:, 1:].mean(1)
  )


@pytest.mark.slow
def test_experiment_tunes_reports_and_reuses_baselines(cifar10_dir, two_lstms, tmp_path):
  experiment = cx.BY_NAME["cifar2"]
  config = cx.Cifar10Config(
    baselines=("sgd",),
    num_problems=3,
    tune_problems=1,
    num_steps=2,
    lr_stride=1,  # one sweep, one compile; coarse-to-fine is tested above
    seed=0,
    task_kwargs={**TINY, "cifar10_dir": cifar10_dir},
    lr_batch_size=0,
    output_dir=str(tmp_path),
  )
  run = lambda learned, log, **kwargs: cx.run_experiment(
    experiment, learned, config, log=log, **{"directory": str(tmp_path), **kwargs}
  )
  results, curves = run({"two_lstms": two_lstms}, lambda s: None)
  assert [r["name"] for r in results["optimizers"]] == ["two_lstms", "sgd"]
  assert results["task"]["classes"] == [5, 6] and "cifar10_dir" not in results["task"]
  sgd = results["optimizers"][1]
  swept = {float(k): v for k, v in sgd["tuning_scores"].items()}
  grid = 1e-6 * 2.0 ** np.arange(30)
  assert sgd["learning_rate"] in grid and len(swept) == 30
  assert sgd["learning_rate"] == pytest.approx(min(swept, key=swept.get), rel=1e-5)
  for name, c in curves.items():
    assert c.train.shape == c.test.shape == (3, 3), name
    assert np.all(np.isfinite(c.test)), name
  assert sgd["train_final_mean"] == pytest.approx(np.mean(curves["sgd"].train[:, -1]))
  # The training curves are train.inner's rollouts of the same problems; the test curves read
  # other images from the same theta_t, so they are other numbers.
  task = tasks.get("cifar10_conv", cifar10_dir=cifar10_dir, classes=[5, 6], **TINY)
  params, keys = inner.sample_problems(task, curves_lib.problem_key(0), 3)
  tx = optax.sgd(sgd["learning_rate"])
  reference = jax.jit(lambda d: inner.rollout_batch(task, tx, d, params, keys, 2))(task.data)
  np.testing.assert_allclose(curves["sgd"].train, reference, rtol=1e-5)
  assert not np.allclose(curves["sgd"].test, curves["sgd"].train)
  pair = results["pairs"][0]
  assert (pair["learned"], pair["other"]) == ("two_lstms", "sgd")
  expected = report.paired(curves["two_lstms"].train[:, -1], curves["sgd"].train[:, -1])
  assert pair["train_steps"]["2"] == pytest.approx(expected) and expected[0] != 0.0

  # Another run's directory with the same setting: the tuned baseline and the learned
  # optimizer's curves (same phi) are reused, not computed again.
  logs = []
  again, again_curves = run(
    {"two_lstms": two_lstms},
    logs.append,
    directory=str(tmp_path / "other"),
    reuse_from=[str(tmp_path / "cache")],
  )
  assert sum("reused" in s for s in logs) == 2, logs
  assert [r["name"] for r in again["optimizers"]] == ["two_lstms", "sgd"]
  for name in ("two_lstms", "sgd"):
    np.testing.assert_array_equal(again_curves[name].test, curves[name].test)

  text = cx.markdown(results)
  assert "| two_lstms | - |" in text and "| two_lstms - sgd |" in text
  cx.plot(results, str(tmp_path / "curves.png"))
  assert os.path.getsize(tmp_path / "curves.png") > 1000
  json.dumps(results)  # results.json is plain JSON


def test_learned_specs_are_checked(tmp_path, two_lstms):
  learned_opt.save(str(tmp_path / "opt"), two_lstms.optimizer, two_lstms.meta_params)
  found = cx.parse_learned([f"a={tmp_path / 'opt'}"])
  assert found["a"].optimizer.config["kind"] == "partition"
  for bad in (["nodir"], ["sgd=x"], [f"a={tmp_path / 'opt'}", f"a={tmp_path / 'opt'}"]):
    with pytest.raises(ValueError, match="--learned"):
      cx.parse_learned(bad)
