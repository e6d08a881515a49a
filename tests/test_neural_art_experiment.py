"""The neural-art runner end to end on a tiny VGG-shaped network: meta-train with the recipe,
evaluate against a tuned baseline in both Figure 8 settings, draw styled images and updates."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from test_neural_art import SIZE, TINY, tiny_weights, write_images

import learned_opt
from experiments import neural_art as runner
from tasks import vgg16
from train import trainer

# The neural-art runner end to end: meta-training, tuning, figures (slow tier).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A two-meta-step run of the recipe (unrolls of 2, horizon 4) on the tiny network."""
  root = tmp_path_factory.mktemp("art_run")
  vgg16.save_npz(str(root / "tiny.npz"), tiny_weights())
  kwargs = {
    "size": SIZE,
    "style": os.path.join(write_images(str(root / "style"), 1, SIZE, seed=2), "img_00.png"),
    "contents": write_images(str(root / "contents"), 12, SIZE, seed=1),
    "vgg_weights": str(root / "tiny.npz"),
    "num_contents": 6,
    **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
  }
  second_style = os.path.join(write_images(str(root / "style2"), 1, SIZE, seed=5), "img_00.png")
  config = runner.train_config(
    str(root / "train"),
    kwargs,
    unroll=2,
    horizon=4,
    num_problems=2,
    num_epochs=1,
    steps_per_epoch=2,
    valid_problems=2,
    log_every=1,
  )
  trainer.train(config, log=lambda s: None)
  settings = (runner.SETTINGS[0], runner.SETTINGS[1]._replace(style=second_style))
  return {"root": root, "kwargs": kwargs, "dir": str(root / "train"), "settings": settings}


def test_recipe_trains_and_records_the_task(run):
  saved = learned_opt.load(run["dir"])
  assert saved.optimizer.config["preprocess"] == "log_sign"
  assert runner.learned_name(saved) == "LSTM"  # labelled by kind in tables and plots
  ntm = saved._replace(optimizer=learned_opt.build({"kind": "ntm_lbfgs"}))
  assert runner.learned_name(ntm) == "NTM-LBFGS"
  metadata = learned_opt.load_metadata(run["dir"])
  assert metadata["run_config"]["task"] == "neural_art"
  assert metadata["run_config"]["unroll"] == 2


def test_recipe_validates_on_held_out_contents_and_old_runs_resume(run, tmp_path):
  config = learned_opt.load_metadata(run["dir"])["run_config"]
  assert config["valid_task_kwargs"] == {"split": "valid", "num_contents": None}
  valid = trainer.validation_task(runner.train_config(run["dir"], run["kwargs"]), None)
  assert valid.config["split"] == "valid"
  old = dict(config)
  del old["valid_task_kwargs"]  # a run started before the recipe validated on held-out contents
  os.makedirs(tmp_path / "old")
  with open(tmp_path / "old" / "config.json", "w") as f:
    json.dump(old, f)
  assert runner.train_config(str(tmp_path / "old"), run["kwargs"]).valid_task_kwargs == {}


def test_evaluate_pairs_test_contents_and_tunes_on_validation(run):
  """The second Figure 8 setting (new style, double size): the one that changes the task most."""
  saved = learned_opt.load(run["dir"])
  out = str(run["root"] / "eval")
  setting = run["settings"][1]
  results = runner.evaluate(
    run["kwargs"],
    {"LSTM": saved},
    [setting],
    out,
    baselines=("adam",),
    num_problems=2,
    tune_problems=1,
    num_steps=3,
    learning_rates=[1e-3, 3e-2],
    log=lambda s: None,
  )["new_style_2x"]
  assert results["task"]["size"] == 2 * SIZE and results["task"]["style"] == setting.style
  assert results["task"]["split"] == "test" and results["task"]["num_contents"] == 2
  lstm, adam = results["optimizers"]
  assert len(lstm["finals"]) == 2 and len(adam["run_means"]) == 2
  assert adam["learning_rate"] in (1e-3, 3e-2) and len(adam["grid_final_means"]) == 2
  # The same test contents for every optimizer: the same losses at theta_0.
  np.testing.assert_allclose(lstm["mean_curve"][0], adam["mean_curve"][0], rtol=1e-6)
  summary = open(os.path.join(out, "results_neural_art.md")).read()
  assert "beat every tuned baseline" in summary and "vs adam" in summary
  assert os.path.isfile(os.path.join(out, "new_style_2x", "curves.png"))
  with open(os.path.join(out, "new_style_2x", "results.json")) as f:
    assert json.load(f)["optimizers"][1]["finals"] == adam["finals"]


def test_reused_baselines_follow_the_whole_setting_not_just_the_counts(run):
  """Same counts and steps but another style: recomputed (once reused stale ones)."""
  out = str(run["root"] / "eval_reuse")
  same, other_style = (
    run["settings"][0],
    run["settings"][0]._replace(style=run["settings"][1].style),
  )
  common = {"baselines": ("adam",), "num_problems": 2, "tune_problems": 1, "num_steps": 3}

  def evaluate(setting, rates):
    logs = []
    results = runner.evaluate(
      run["kwargs"], {}, [setting], out, learning_rates=rates, reuse_baselines=True,
      log=logs.append, **common,
    )["train_style"]  # fmt: skip
    return results["optimizers"][0], any("reused" in s for s in logs)

  first, reused = evaluate(same, [1e-3, 3e-2])
  assert not reused
  again, reused = evaluate(same, [1e-3, 3e-2])
  assert reused and again["finals"] == first["finals"]
  # Baselines tuned on another grid are gathered (the documented two-grid workflow), and the
  # results name the grid they were tuned on.
  regridded, reused = evaluate(same, [1e-2])
  assert reused and regridded == first
  with open(os.path.join(out, "train_style", "results.json")) as f:
    assert json.load(f)["tuning"]["learning_rates"] == [1e-3, 3e-2]
  restyled, reused = evaluate(other_style, [1e-3, 3e-2])
  assert not reused and restyled["finals"] != first["finals"]


def test_figures(run):
  saved = learned_opt.load(run["dir"])
  out = str(run["root"] / "figures")
  os.makedirs(out)
  path = runner.styled_figure(saved, run["kwargs"], run["settings"][1], out, 2, 3, 0.02)
  with Image.open(path) as image:
    # Two rows (contents) of four images (content, LSTM, Adam, style) at double resolution.
    scale = 256 // (2 * SIZE)
    assert image.size == (4 * 2 * SIZE * scale, 2 * 2 * SIZE * scale)
  (plot,) = runner.update_figures(saved, run["kwargs"], out, 3, 1.0, 0.02, [2])
  with open(plot.replace(".png", ".json")) as f:
    traces = json.load(f)
  assert set(traces["proposed"]) == {"LSTM", "ADAM", "SGD"} and len(traces["gradient"]) == 3
  assert np.isfinite(traces["response"]["LSTM"]).all() and os.path.isfile(plot)
