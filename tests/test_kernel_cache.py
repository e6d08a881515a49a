"""The C++ kernel cache (learned_opt/kernels/build.py) loads only what this user built (issue 28).

Each test plants or damages files in a private cache, using a tiny probe library whose
constructor appends who built it to a marker file: a marker line from a planted library is code
another user ran as us.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import learned_opt
from learned_opt.kernels import build, cache_trust, loading

pytestmark = pytest.mark.skipif(
  shutil.which("c++") is None and shutil.which("g++") is None,
  reason="no C++ compiler (c++ or g++) to build the probe with",
)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")

MARKER_ENV_VAR = "LEARNED_OPT_TEST_MARKER"
SYMBOL = "learned_opt_probe"
FOREIGN_UID = 12345
PROBE = """\
#include <cstdio>
#include <cstdlib>

extern "C" const char learned_opt_probe_id[] = "{name}";  // distinct bytes for every test

extern "C" int learned_opt_probe() {{ return 42; }}

__attribute__((constructor)) static void announce() {{
  const char* marker = std::getenv("{marker}");
  if (marker == nullptr) return;
  std::FILE* f = std::fopen(marker, "a");
  if (f == nullptr) return;
  std::fputs("{who}\\n", f);
  std::fclose(f);
}}
"""


def _unregistered(*args, **kwargs):
  """Not ``jax.ffi.register_ffi_target``: XLA would call the probe as an FFI handler."""


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A fresh cache root in $LEARNED_OPT_CACHE, the marker file in $LEARNED_OPT_TEST_MARKER;
  ``loading.targets`` loads libraries and looks their symbols up but registers nothing."""
  monkeypatch.setattr(jax.ffi, "register_ffi_target", _unregistered)
  monkeypatch.setenv(build.CACHE_ENV_VAR, str(tmp_path / "cache"))
  monkeypatch.setenv(MARKER_ENV_VAR, str(tmp_path / "marker"))
  monkeypatch.delenv("CXX", raising=False)
  return tmp_path / "cache"


def _probe(directory, name: str, who: str) -> str:
  """Writes the probe source into ``directory``; its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "probe.cc")
  with open(path, "w") as f:
    f.write(PROBE.format(name=name, marker=MARKER_ENV_VAR, who=who))
  return path


@pytest.fixture
def source(tmp_path, request):
  """This test's own probe (so its library is loaded afresh in this process)."""
  return _probe(tmp_path / "source", request.node.name, "built")


def _marker(cache) -> str:
  """Who the loaded libraries said they were, one line each; "" if none ran."""
  path = cache.parent / "marker"
  return path.read_text() if path.exists() else ""


def _planted(tmp_path, source, name: str) -> bytes:
  """``source``'s probe with a constructor that says "planted", built as ``name``; its bytes."""
  os.makedirs(tmp_path / "planted", exist_ok=True)
  planted = tmp_path / "planted" / "probe.cc"
  planted.write_text(open(source).read().replace('fputs("built', 'fputs("planted'))
  output = str(tmp_path / "planted" / name)
  build.compile_library(build.compiler(), str(planted), output)
  with open(output, "rb") as f:
    return f.read()


def _write(path, content: bytes, mode: int) -> None:
  """``content`` into ``path``, with ``mode`` (whatever the umask)."""
  with open(path, "wb") as f:
    f.write(content)
  os.chmod(path, mode)


def _sidecar(content: bytes, name: str) -> bytes:
  """A sidecar that matches ``content``, as the build writes it."""
  return f"{hashlib.sha256(content).hexdigest()}  {name}\n".encode()


def _plant(tmp_path, cache, source) -> str:
  """A planted probe under the cached library's name with a sidecar matching it; its path."""
  kernels = cache / "kernels"
  os.makedirs(kernels, mode=0o700)
  os.chmod(cache, 0o700)
  name = build.library_name(build.compiler(), source)
  content = _planted(tmp_path, source, name)
  _write(kernels / name, content, 0o755)
  _write(kernels / (name + ".sha256"), _sidecar(content, name), 0o644)
  return str(kernels / name)


@pytest.mark.parametrize("which", ["library", "sidecar"])
@pytest.mark.parametrize(
  "how",
  ["writable", pytest.param("foreign", marks=as_root)],
)
def test_a_planted_file_others_could_write_is_not_loaded(tmp_path, cache, source, which, how):
  path = _plant(tmp_path, cache, source)
  target = path if which == "library" else path + ".sha256"
  if how == "writable":
    os.chmod(target, 0o666)
    problem = r"writable by group and others \(mode 0666\)"
  else:
    os.chown(target, FOREIGN_UID, FOREIGN_UID)
    problem = f"owned by uid {FOREIGN_UID}, not by you"
  expected = f"{re.escape(path)} is not trusted.*{problem}.*rm -f"
  with pytest.raises(build.KernelUnavailable, match=expected):
    loading.targets(source, (SYMBOL,))
  assert _marker(cache) == ""  # the planted constructor never ran


@pytest.mark.parametrize(
  "where, change, problem",
  [
    ("root", 0o777, r"writable by group and others \(mode 0777\).*chmod go-w {path}"),
    ("kernels", 0o770, r"writable by group \(mode 0770\).*chmod go-w {path}"),
    pytest.param("root", FOREIGN_UID, f"owned by uid {FOREIGN_UID}", marks=as_root),
  ],
  ids=["root-0777", "kernels-0770", "root-foreign"],
)
def test_a_cache_directory_others_could_write_is_refused(cache, source, where, change, problem):
  build.library(source)  # a good build, then the directory is opened up
  path = cache if where == "root" else cache / "kernels"
  if change == FOREIGN_UID:
    os.chown(path, FOREIGN_UID, FOREIGN_UID)
  else:
    os.chmod(path, change)
  kernels, escaped = re.escape(str(cache / "kernels")), re.escape(str(path))
  expected = f"kernel cache {kernels} is not private: {escaped} .*" + problem.format(path=escaped)
  with pytest.raises(build.KernelUnavailable, match=expected + r".*\$LEARNED_OPT_CACHE"):
    loading.targets(source, (SYMBOL,))
  assert _marker(cache) == ""


def test_directories_are_made_private_and_a_sticky_ancestor_is_fine(tmp_path, cache, source):
  os.chmod(tmp_path, 0o1777)  # like /tmp
  loading.targets(source, (SYMBOL,))
  assert _marker(cache) == "built\n"
  for directory in (cache, cache / "kernels"):
    assert os.stat(directory).st_mode & 0o777 == 0o700


def test_a_refused_cache_falls_back_under_auto_and_raises_under_cpu_kernels(cache, monkeypatch):
  os.makedirs(cache, mode=0o777)
  os.chmod(cache, 0o777)
  monkeypatch.setattr(loading, "_WARNED", set())
  monkeypatch.setattr(jax, "device_count", lambda *args: 1)  # where auto uses the kernels
  opt = learned_opt.lstm_optimizer(hidden_size=2, backend="auto")
  phi = opt.init_meta_params(jax.random.key(0))
  grads = {"w": jnp.ones((3,))}
  auto = learned_opt.as_optax(opt, phi)
  with pytest.warns(RuntimeWarning, match="auto.*unavailable.*not private.*chmod go-w"):
    assert "ffi_call" not in str(jax.make_jaxpr(auto.update)(grads, auto.init(grads)))
  insist = learned_opt.as_optax(opt, phi, backend="cpu_kernels")
  with pytest.raises(build.KernelUnavailable, match="cpu_kernels.*not private.*backend='auto'"):
    jax.make_jaxpr(insist.update)(grads, insist.init(grads))
  assert sorted(os.listdir(cache)) == ["kernels"]  # nothing built there


@pytest.mark.slow
def test_a_truncated_library_is_rebuilt_in_a_process_that_survives(cache, source):
  path = build.library(source)
  whole = open(path, "rb").read()
  with open(path, "r+b") as f:
    f.truncate(len(whole) // 2)
  load = (
    "import jax; from learned_opt.kernels import loading; "
    "jax.ffi.register_ffi_target = lambda *args, **kwargs: None; "
    f"loading.targets({source!r}, ({SYMBOL!r},))"
  )
  done = subprocess.run(
    [sys.executable, "-c", load + "; print('loaded')"], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]  # a SIGBUS is returncode -7
  assert done.stdout.strip() == "loaded" and _marker(cache) == "built\n"
  rebuilt = cache_trust.verified(path)  # whole again, with its sidecar
  assert rebuilt is not None and len(rebuilt) > len(whole) // 2


@pytest.mark.parametrize("damage", ["other_bytes", "no_sidecar", "bad_sidecar"])
def test_a_library_not_matching_its_sidecar_is_rebuilt(tmp_path, cache, source, damage):
  path = build.library(source)
  planted = _planted(tmp_path, source, os.path.basename(path))
  _write(path, planted, 0o755)  # ours, right mode, other bytes: a sidecar match is needed
  if damage == "no_sidecar":
    os.remove(path + ".sha256")
  elif damage == "bad_sidecar":
    _write(path + ".sha256", b"not a hash\n", 0o644)
  loading.targets(source, (SYMBOL,))
  assert _marker(cache) == "built\n"
  assert cache_trust.verified(path) not in (None, planted)  # rebuilt, with its sidecar


def test_the_build_syncs_each_file_before_renaming_it_and_the_sidecar_goes_first(
  tmp_path, monkeypatch
):
  events = []
  fsync, replace = os.fsync, os.replace

  def recorded_fsync(handle):
    events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{handle}"))))
    fsync(handle)

  def recorded_replace(src, dst):
    events.append(("replace", os.path.basename(src), os.path.basename(dst)))
    replace(src, dst)

  def fake_compile(cxx, source, output, flags=build.BUILD_FLAGS):
    with open(output, "wb") as f:
      f.write(b"library")

  if not os.path.isdir("/proc/self/fd"):
    pytest.skip("needs /proc/self/fd to name what is synced")
  monkeypatch.setattr(build, "compile_library", fake_compile)
  monkeypatch.setattr(build, "library_name", lambda cxx, source, flags: "probe-test.so")
  monkeypatch.setattr(os, "fsync", recorded_fsync)
  monkeypatch.setattr(os, "replace", recorded_replace)
  build.library("unused.cc", build.compiler(), str(tmp_path / "cache"))
  renames = [e for e in events if e[0] == "replace"]
  assert [e[2] for e in renames] == ["probe-test.so.sha256", "probe-test.so"]
  for rename in renames:
    assert events.index(("fsync", rename[1])) < events.index(rename)  # its bytes are on disk
  assert events[-1] == ("fsync", "cache")  # the directory, after the renames
