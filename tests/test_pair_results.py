"""experiments.pair_results: paired differences across evaluations of the same problems."""

import json

import numpy as np
import pytest

from eval import report
from experiments import pair_results


def _evaluation(path, curves: dict, seed=2016, rates=None):
  path.mkdir()
  results = {
    "task": {"name": "cifar10_conv"},
    "seed": seed,
    "num_problems": 4,
    "num_steps": 60,
    "optimizers": [{"name": n, "learning_rate": (rates or {}).get(n)} for n in curves],
  }
  (path / "results.json").write_text(json.dumps(results))
  arrays = {f"{n}/{obs}": c for n, c in curves.items() for obs in ("train", "test")}
  np.savez(path / "curves.npz", **arrays)
  return str(path)


def test_differences_are_paired_per_problem_and_refuse_other_problems(tmp_path):
  rng = np.random.default_rng(0)
  mine, adam = rng.uniform(1, 2, (4, 61)), rng.uniform(1, 2, (4, 61))
  new = _evaluation(tmp_path / "new", {"winner": mine})
  old = _evaluation(tmp_path / "old", {"adam": adam, "winner": mine * 0}, rates={"adam": 0.0164})
  lines = pair_results.table(f"{new}:winner", [old]).splitlines()
  assert lines[0] == "| other | lr | mean over run | step 10 | step 25 | step 50 | step 60 |"
  assert len(lines) == 4  # a namesake in another evaluation is another optimizer: compared
  assert lines[3].startswith(f"| winner ({old}) | - | +1.") and "+0.0000 ± 0.0000" not in lines[3]
  cells = lines[2].split(" | ")
  assert cells[0] == f"| adam ({old})" and cells[1] == "0.0164"
  over_run = np.mean(mine[:, 1:], 1) - np.mean(adam[:, 1:], 1)
  assert cells[2] == report.pm((over_run.mean(), report.stderr(over_run)))
  step10 = mine[:, 10] - adam[:, 10]
  assert cells[3] == report.pm((step10.mean(), report.stderr(step10)))
  itself = pair_results.table(f"{new}:winner", [new]).splitlines()
  assert len(itself) == 2  # the optimizer is not paired with itself
  elsewhere = _evaluation(tmp_path / "seed7", {"adam": adam}, seed=7)
  with pytest.raises(ValueError, match="ran other problems: seed 7, not 2016"):
    pair_results.table(f"{new}:winner", [elsewhere])
