"""What an installed learned-opt offers besides its modules: version, typing marker, commands."""

import configparser
import fnmatch
import importlib.metadata
import os
import shutil
import subprocess

import pytest

import learned_opt


def test_version_is_the_installed_distributions():
  assert learned_opt.__version__ == importlib.metadata.version("learned-opt")


@pytest.mark.slow
def test_console_scripts_name_the_command_line_entry_points():
  scripts = {
    e.name: e
    for e in importlib.metadata.entry_points(group="console_scripts")
    if e.name.startswith("learned-opt-")
  }
  assert {name: e.value for name, e in scripts.items()} == {
    "learned-opt-eval": "eval.evaluate:run",
    "learned-opt-export": "train.export:run",
    "learned-opt-train": "train.meta_train:run",
  }
  # The installed command runs the job's flag checks (here one that fails before compiling).
  result = subprocess.run(
    [shutil.which("learned-opt-train"), "--output_dir=unused", "--unroll=200"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0 and "--unroll=200 is longer than --horizon=100" in result.stderr


def test_typed_marker_and_license_ship():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert os.path.isfile(os.path.join(os.path.dirname(learned_opt.__file__), "py.typed"))
  with open(os.path.join(root, "LICENSE")) as f:
    assert "Apache License" in f.read(200)


def test_package_data_ships_every_kernel_source():
  """The C++ kernels compile on the user's machine: their .cc and .h files must be in the wheel."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = configparser.ConfigParser()
  parser.read(os.path.join(root, "setup.cfg"))
  patterns = [p.strip() for p in parser["options.package_data"]["learned_opt"].split(",")]
  kernels = os.path.join(os.path.dirname(learned_opt.__file__), "kernels")
  sources = [n for n in os.listdir(kernels) if n.endswith((".cc", ".h"))]
  assert {
    "lstm_gates.cc",
    "lstm_stack.cc",
    "simd.h",
    "gates.h",
    "tile_matmul.h",
  } <= set(sources)
  for name in sources:
    assert any(fnmatch.fnmatch(f"kernels/{name}", p) for p in patterns), name
