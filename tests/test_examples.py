"""The runnable examples run as README shows them (a short run), and say what they compare."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_optax_digits_example_trains_and_plots(tmp_path):
  output = tmp_path / "digits.png"
  result = subprocess.run(
    [
      sys.executable,
      "examples/optax_digits.py",
      "--steps=30",
      "--adam_lrs=1e-3",
      f"--output={output}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  rows = [line.split() for line in lines if line.startswith("  ")]
  assert [row[0] for row in rows] == ["pretrained:mnist_mlp", "adam"]
  losses = [float(row[-6]) for row in rows]  # "NAME  FINAL  (mean over the run MEAN)"
  # 30 steps from log(10) = 2.30: both optimizers must have made progress, neither diverged.
  assert all(0.0 < loss < 2.3 for loss in losses), lines
  assert output.stat().st_size > 1000


def test_readme_optax_snippet_runs(tmp_path):
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme.split("## Use a trained optimizer in optax", 1)[1]
  snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
  script = tmp_path / "snippet.py"
  check = "finite = jax.tree.map(lambda a: bool(jnp.isfinite(a).all()), params)"
  script.write_text(f"{snippet}\n{check}\nassert all(jax.tree.leaves(finite))\nprint('ok')\n")
  result = subprocess.run(
    [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("ok")
