"""The command-line jobs rerun themselves once with tcmalloc preloaded, where it is installed."""

import os
import subprocess
import sys

import pytest

from train import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(
  not sys.platform.startswith("linux"),
  reason="the rerun is Linux's (LD_PRELOAD, /proc/self/maps); elsewhere it never happens",
)


@linux_only
def test_tcmalloc_is_preloaded_once_where_found():
  found = lambda: "/opt/lib/libtcmalloc_minimal.so.4"
  env = allocator.preload_env({"PATH": "/bin", allocator.ENV: "tcmalloc"}, find=found)
  assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4" and env["PATH"] == "/bin"
  assert allocator.preload_env(env, find=found) is None  # the rerun does not rerun again
  kept = allocator.preload_env({allocator.ENV: "tcmalloc", "LD_PRELOAD": "/x/a.so"}, find=found)
  assert kept["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4 /x/a.so"
  with pytest.raises(ValueError, match=r"=tcmalloc, but no libtcmalloc.*apt-get install"):
    allocator.preload_env({allocator.ENV: "tcmalloc"}, find=lambda: None)


def test_the_system_malloc_is_the_default():
  found = lambda: "/opt/lib/libtcmalloc_minimal.so.4"
  assert allocator.preload_env({}, find=found) is None
  assert allocator.preload_env({allocator.ENV: "system"}, find=found) is None


@linux_only
def test_a_path_is_preloaded_and_a_missing_one_is_named(tmp_path):
  library = tmp_path / "libmy_malloc.so"
  library.write_bytes(b"")
  env = allocator.preload_env({allocator.ENV: str(library)}, find=lambda: None)
  assert env["LD_PRELOAD"] == str(library)
  with pytest.raises(ValueError, match=r"LEARNED_OPT_MALLOC='/no/lib.so' is not a file.*tcmalloc"):
    allocator.preload_env({allocator.ENV: "/no/lib.so"})


def _mapped(basename: str) -> str:
  with open("/proc/self/maps") as f:
    for line in f:
      path = line.split()[-1]
      if os.path.basename(path) == basename:
        return path
  pytest.skip(f"{basename} is not mapped in this process")


@linux_only
@pytest.mark.slow
def test_the_process_reruns_with_the_library_mapped():
  """A real rerun, with libm (harmless to preload) standing in for tcmalloc."""
  libm = _mapped("libm.so.6")
  code = (
    "import os; from train import allocator; allocator.rerun_with_chosen_malloc(); "
    "print(allocator.active()); print(os.environ['LD_PRELOAD'])"
  )
  env = {**os.environ, allocator.ENV: libm, "LD_PRELOAD": ""}
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [libm, libm]
  assert f"Using {libm} as malloc" in out.stderr and out.stderr.count("Using") == 1


@linux_only
@pytest.mark.slow
def test_the_training_command_names_a_bad_library_before_anything_else(tmp_path):
  env = {**os.environ, allocator.ENV: str(tmp_path / "missing.so")}
  out = subprocess.run(
    [sys.executable, "-m", "train.meta_train", f"--output_dir={tmp_path / 'run'}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=120,
  )
  assert out.returncode != 0
  assert "LEARNED_OPT_MALLOC=" in out.stderr and "is not a file" in out.stderr
  assert not (tmp_path / "run").exists()
