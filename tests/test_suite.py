"""The held-out suite: its numbers against hand computations, and the command end to end."""

import json
import math
import os

import jax
import numpy as np
import pytest

import learned_opt
from eval import suite, suite_report
from train import command_line


def _flat(values, problems=2):
  return np.tile(np.asarray(values, np.float64), (problems, 1))


def test_final_loss_is_the_mean_of_the_last_five_percent():
  curves = _flat(np.arange(41.0))  # 40 steps: window 2
  assert suite_report.window(40) == 2
  assert suite_report.final_loss(curves) == pytest.approx(39.5)
  assert suite_report.final_loss(_flat([1.0, np.nan])) == math.inf


def test_smoothed_is_a_trailing_mean_over_the_window():
  curves = np.array([[0.0, 2.0, 4.0, 6.0, 8.0] * 8 + [0.0]])  # 40 steps: window 2
  got = suite_report.smoothed(curves)
  assert got[0] == 0.0 and got[1] == pytest.approx(1.0) and got[4] == pytest.approx(7.0)


def test_sampled_curves_keep_about_200_points():
  curves = _flat(np.arange(1001.0))
  assert suite_report.curve_stride(1000) == 5
  got = suite_report.sampled(curves)
  assert len(got) == 201 and got[-1] == pytest.approx(suite_report.smoothed(curves)[-1])


def test_diverged_means_not_finite_or_worse_than_the_start():
  assert suite_report.diverged(_flat([1.0, 0.5, np.inf]))
  assert suite_report.diverged(_flat([1.0] + [2.0] * 20))
  assert not suite_report.diverged(_flat([1.0] + [0.5] * 20))


def test_speedup_both_ways():
  steps = 100
  fast = _flat(np.linspace(1.0, 0.0, steps + 1) ** 4)  # reaches low losses early
  slow = _flat(np.linspace(1.0, 0.5, steps + 1))  # final loss about 0.51
  # The learned optimizer is slow: Adam (fast) reaches its final loss at step s < T.
  s = np.flatnonzero(suite_report.smoothed(fast) <= suite_report.final_loss(slow))[0]
  assert suite_report.speedup(slow, fast) == pytest.approx(s / steps)
  assert suite_report.speedup(slow, fast) < 1
  # The learned optimizer is fast: Adam never reaches its final loss; T / steps it needs.
  mine = np.flatnonzero(suite_report.smoothed(fast) <= suite_report.final_loss(slow))[0]
  assert suite_report.speedup(fast, slow) == pytest.approx(steps / mine)
  assert suite_report.speedup(fast, slow) > 1
  assert suite_report.speedup(_flat([1.0, np.nan]), slow) == 0.0


def test_interquartile_mean():
  assert suite_report.interquartile_mean([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)
  # n = 5: the middle 2.5 values, the outer two weighted 0.75: (0.75*2 + 3 + 0.75*4) / 2.5.
  assert suite_report.interquartile_mean([1, 2, 3, 4, 100]) == pytest.approx(3.0)
  assert suite_report.interquartile_mean([1, 2, 3, 4, 1e9]) < 4
  assert suite_report.interquartile_mean([1, 2, 3, 4, 5, 6, 7, np.inf]) == pytest.approx(4.5)


def _row(ratio, beats, div=False):
  return {"ratio_to_tuned_adam": ratio, "beats_adam_default": beats, "diverged": div,
          "speedup_vs_tuned_adam": 1.0}  # fmt: skip


def test_aggregate_applies_the_floors():
  good = [_row(0.9, True)] * 4 + [_row(1.2, False)]
  summary = suite_report.aggregate(good)
  assert summary["beats_adam_default"] == 0.8 and summary["median_ratio"] == 0.9
  assert summary["meets_floors"]
  assert not suite_report.aggregate(good[:3] + [_row(1.2, False)] * 2)["meets_floors"]
  assert not suite_report.aggregate(good[:4] + [_row(0.5, True, div=True)])["meets_floors"]


def test_task_row_ratio_and_default_adam():
  curves = {
    "mine": _flat([1.0] + [0.2] * 40),
    "adam": _flat([1.0] + [0.4] * 40),
    "adam_1e-3": _flat([1.0] + [0.1] * 40),
  }
  curves["mine"][1] *= 2  # the second problem's ratio is 1.0
  row = suite_report.task_row("t", curves, "mine")
  assert row["ratio_to_tuned_adam"] == pytest.approx(0.6 / 0.8)
  assert row["problem_ratios"] == pytest.approx([0.5, 1.0])
  assert not row["beats_adam_default"] and not row["diverged"]


def test_learning_rates_are_the_paper_grid_up_to_the_maximum():
  rates = suite.learning_rates(1.1)
  assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1e-6 * 2**20)
  assert np.allclose(np.diff(np.log2(rates)), 1.0)


def test_suite_end_to_end_on_the_tiny_tasks(tmp_path, capsys):
  """The command's main on the two tiny tasks: files written, numbers consistent, a progress
  line with rate and ETA after the first task, baselines cached for the next optimizer, an
  earlier suite.json kept unless --overwrite."""
  opt = learned_opt.build({"kind": "per_param_mlp", "hidden_size": 4, "num_layers": 1})
  saved = os.path.join(tmp_path, "opt")
  learned_opt.save(saved, opt, opt.init_meta_params(jax.random.key(0)))
  out = os.path.join(tmp_path, "suite")
  settings = dict(tiny=True, num_problems=2, output_dir=out, stride=1, max_learning_rate=0.1)
  suite.main(suite.SuiteConfig(optimizer=(f"mine={saved}",), **settings))
  printed = capsys.readouterr().out
  first = [line for line in printed.splitlines() if line.startswith("suite: task 1/2")]
  assert len(first) == 1 and "s/task, ETA" in first[0], printed
  assert "suite: task 2/2" not in printed  # the last task's end is the summary's
  results = json.load(open(os.path.join(out, "suite.json")))
  assert os.path.getsize(os.path.join(out, "suite.png")) > 1000
  assert "## mine" in open(os.path.join(out, "suite.md")).read()
  part = results["learned"]["mine"]
  assert [r["task"] for r in part["tasks"]] == [t["task"] for t in results["tasks"]]
  assert part["summary"]["num_tasks"] == 2
  for record, row in zip(results["tasks"], part["tasks"], strict=True):
    finals = record["final_losses"]
    assert set(finals) == {"mine", "adam", "nag", "adamw", "adam_1e-3"}
    assert record["learning_rates"]["adam_1e-3"] == pytest.approx(1e-3)
    assert row["ratio_to_tuned_adam"] == pytest.approx(finals["mine"] / finals["adam"])
    assert len(record["mean_curves"]["mine"]) == record["num_steps"] + 1  # 30 steps: stride 1
  with pytest.raises(command_line.UsageError, match="already holds suite.json"):
    suite.main(suite.SuiteConfig(optimizer=(f"other={saved}",), **settings))
  suite.main(suite.SuiteConfig(optimizer=(f"other={saved}",), overwrite=True, **settings))
  second = json.load(open(os.path.join(out, "suite.json")))
  for a, b in zip(results["tasks"], second["tasks"], strict=True):
    assert a["final_losses"]["adam"] == b["final_losses"]["adam"]  # from the cache
    assert a["final_losses"]["mine"] == b["final_losses"]["other"]  # the same phi


@pytest.mark.parametrize(
  "settings, message",
  [
    (dict(optimizer=()), "--optimizer is required"),
    (dict(baselines=("nag",)), "must include adam"),
    (dict(baselines=("adam", "lion")), "lion"),
    (dict(stride=0), "--stride"),
  ],
)
def test_bad_settings_are_refused_by_name(tmp_path, settings, message):
  settings = {"optimizer": ("pretrained:quadratic",), "output_dir": str(tmp_path), **settings}
  with pytest.raises(ValueError, match=message):
    suite.SuiteConfig(**settings)
