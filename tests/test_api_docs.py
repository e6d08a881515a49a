"""The API reference (docs/api) builds from the docstrings without a warning, as CI builds it."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a Sphinx build in a child process (~6 s on 2 cores)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_api_reference_builds_with_warnings_as_errors(tmp_path):
  pytest.importorskip("sphinx", reason='pip install -e ".[docs]"')
  out = tmp_path / "html"
  result = subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
     os.path.join(ROOT, "docs", "api"), str(out)],
    cwd=tmp_path, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-4000:]
  assert "WARNING" not in result.stderr, result.stderr[-4000:]
  commands = (out / "commands.html").read_text()
  # Each command's --help, rendered at build time: its own flags are on the page.
  for flag in ("--task_kwargs", "--run_dir", "--baselines", "--optimizer", "--lr_stride"):
    assert flag in commands, flag
  learned_opt = (out / "learned_opt.html").read_text()
  for name in ("as_optax", "pretrained", "build", "load", "save"):
    assert re.search(rf'id="learned_opt\.{name}"', learned_opt), name
  assert "learned_opt.as_optax" in (out / "optax_example.html").read_text()
  for page in ("tasks", "train", "eval"):
    assert (out / f"{page}.html").stat().st_size > 5000, page
