"""experiments.seed_table: one recipe's seeds, evaluated on the same problems, side by side."""

import json

import numpy as np
import pytest

from eval import report
from experiments import seed_table


def _optimizer(name, kind, finals, rate=None):
  finals = np.asarray(finals, np.float64)
  return {
    "name": name, "kind": kind, "learning_rate": rate, "finals": finals.tolist(),
    "final_mean": float(finals.mean()), "final_stderr": report.stderr(finals), "num_diverged": 0,
  }  # fmt: skip


def _evaluation(path, learned: dict, adam, sgd, seed=2016):
  path.mkdir()
  results = {
    "task": {"name": "quadratic"}, "seed": seed, "num_problems": 4, "num_steps": 100,
    "optimizers": [
      *(_optimizer(n, "learned", f) for n, f in learned.items()),
      _optimizer("adam", "baseline", adam, 1.05), _optimizer("sgd", "baseline", sgd, 0.0164),
    ],
  }  # fmt: skip
  (path / "results.json").write_text(json.dumps(results))
  return str(path)


def test_tables_pair_each_seed_with_its_best_baseline_and_refuse_other_problems(tmp_path):
  adam, sgd = np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 5.0, 5.0, 5.0])
  lstm0, gac0 = adam - [0.5, 0.4, 0.6, 0.5], adam - [0.7, 0.8, 0.6, 0.9]
  lstm1 = adam + [0.1, -0.1, 0.2, 0.0]
  gac1 = lstm1 + [1.0, 1.0, 1.0, 1.0]
  one = _evaluation(tmp_path / "seed_0", {"lstm": lstm0, "gac": gac0}, adam, sgd)
  two = _evaluation(tmp_path / "seed_1", {"lstm": lstm1, "gac": gac1}, adam, sgd)
  lines = seed_table.markdown(seed_table.load([one, two])).splitlines()
  finals = lines[lines.index("| optimizer | seed_0 | seed_1 | over seeds |") + 2 :][:3]
  assert [row.split(" | ")[0] for row in finals] == ["| lstm", "| gac", "| adam"]
  means = [lstm0.mean(), lstm1.mean()]
  assert finals[0].endswith(f"{np.mean(means):.4f} ± {np.std(means, ddof=1):.4f} |")
  assert "seed_0: adam lr 1.05, seed_1: adam lr 1.05" in "\n".join(lines)
  vs_best = [row for row in lines if row.endswith(" of 2 |")]
  d = lstm0 - adam
  assert vs_best[0] == (
    f"| lstm | {report.pm((d.mean(), report.stderr(d)))} | "
    f"{report.pm(report.paired(lstm1, adam))} | 1 of 2 |"
  )  # seed 0 beats Adam by > 2 standard errors, seed 1 ties it
  assert vs_best[1].startswith("| gac |") and vs_best[1].endswith("| 1 of 2 |")
  assert vs_best[2] == (
    f"| gac | {report.pm(report.paired(gac0, lstm0))} | +1.0000 ± 0.0000 | 1 of 2 |"
  )  # against the lstm of the same seed; the lstm itself has no row there
  assert len(vs_best) == 3
  other = _evaluation(tmp_path / "seed_2", {"lstm": lstm0}, adam, sgd, seed=7)
  with pytest.raises(ValueError, match="ran other problems: seed 7, not 2016"):
    seed_table.load([one, other])
  fewer = _evaluation(tmp_path / "seed_3", {"lstm": lstm0}, adam, sgd)
  with pytest.raises(ValueError, match="seed_3 has no optimizer 'gac'"):
    seed_table.markdown(seed_table.load([one, fewer]))
