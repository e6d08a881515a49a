"""Compiling a C++ XLA FFI kernel for this CPU on first use, cached, and registering it with JAX.

``library(source)`` compiles ``source`` with the system C++ compiler (``$CXX``, else ``c++`` or
``g++``) into ``$LEARNED_OPT_CACHE/kernels`` (default ``~/.cache/learned_opt/kernels``). The
file name is a hash of the source and the headers beside it, the flags, the compiler, jaxlib's
version and the CPU's feature flags (the build targets this CPU), so a cached build is reused
only where it fits. Nothing is built at install time. ``register(path, symbol)`` loads a built
library and registers one of its handlers as a CPU FFI target; ``targets(source, symbols)`` does
both once per process.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jaxlib.version

CACHE_ENV_VAR = "LEARNED_OPT_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "learned_opt")
BUILD_FLAGS = (
  # Full optimization: register-tiled loops must be unrolled and kept in registers.
  "-O3",
  # A kernel is compiled on, and only for, the machine that runs it (the cache key holds this
  # CPU's feature flags): use its widest vectors (AVX-512 or AVX2) and FMA.
  "-march=native",
  # std::log never sets errno here, so the compiler need not keep it a library call with side
  # effects. Not -ffast-math: it assumes no NaN or inf, and a NaN gradient must give a NaN update
  # (as_optax's nan_policy="propagate"), and it could reassociate exp's rounding step.
  "-fno-math-errno",
  "-std=c++17",
  # A shared library that ctypes loads, using threads.
  "-shared",
  "-fPIC",
  "-pthread",
)
BUILD_TIMEOUT_S = 600

_REGISTERED: set[str] = set()
_LIBRARIES: list[ctypes.CDLL] = []  # loaded libraries stay referenced for the process's life
_LOCK = threading.Lock()
_TARGETS: dict[tuple, tuple[str, ...]] = {}  # (source, symbols, compiler, cache) -> targets
_FAILURES: dict[tuple, str] = {}  # the same key -> why the kernel is unavailable
_WARNED: set[str] = set()


class KernelUnavailable(RuntimeError):
  """A kernel cannot be built or loaded here; the message says why."""


def compiler() -> str | None:
  """The C++ compiler to build with: ``$CXX`` if set (None if it does not exist), else c++/g++."""
  chosen = os.environ.get("CXX")
  if chosen:
    return shutil.which(chosen)
  return shutil.which("c++") or shutil.which("g++")


def cache_dir() -> str:
  """``$LEARNED_OPT_CACHE/kernels``, else ``~/.cache/learned_opt/kernels``; absolute."""
  root = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
  return os.path.join(os.path.abspath(os.path.expanduser(root)), "kernels")


def cpu_features() -> str:
  """This CPU's feature flags (Linux), else its name: what ``-march=native`` compiles for."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return f"{platform.machine()} {platform.processor()}"


def headers(source: str) -> list[str]:
  """The ``.h`` files beside ``source``, which it may include: part of its cache key."""
  directory = os.path.dirname(os.path.abspath(source))
  return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".h"))


def library_name(cxx: str, source: str) -> str:
  """The cached library's file name: the source's stem and a hash of all that shapes the code
  (the source and the headers beside it, the flags, the compiler, jaxlib and this CPU)."""
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
  key = hashlib.sha256()
  for path in (source, *headers(source)):
    with open(path, "rb") as f:
      key.update(f.read())
    key.update(b"\0")
  for part in (" ".join(BUILD_FLAGS).encode(), version.encode(), cpu_features().encode()):
    key.update(part)
    key.update(b"\0")
  key.update(jaxlib.version.__version__.encode())  # the FFI headers and ABI it was built against
  stem = os.path.splitext(os.path.basename(source))[0]
  return f"{stem}-{key.hexdigest()[:20]}.so"


def compile_library(cxx: str, source: str, output: str) -> None:
  """Compiles ``source`` into the shared library ``output``; raises ``KernelUnavailable``."""
  command = [cxx, *BUILD_FLAGS, "-I", jax.ffi.include_dir(), source, "-o", output]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise KernelUnavailable(f"compiling it with {cxx} failed ({e})") from e
  if done.returncode != 0:
    tail = done.stderr.strip().splitlines()[-5:]
    raise KernelUnavailable(
      f"compiling it with {cxx} failed (exit {done.returncode}): " + " | ".join(tail)
    )


def library(source: str, cxx: str | None = None, directory: str | None = None) -> str:
  """The path of ``source`` compiled, compiling it unless the cache already holds it.

  The library is written to a temporary file and renamed into place, so concurrent processes
  never load a half-written one. A cache directory that cannot be written: built in a temporary
  directory instead (for this process only).

  Args:
    source: the C++ file.
    cxx: the compiler; default ``compiler()``.
    directory: the cache; default ``cache_dir()``.

  Raises:
    KernelUnavailable: no compiler, or the build failed.
  """
  cxx = cxx or compiler()
  if cxx is None:
    wanted = os.environ.get("CXX")
    raise KernelUnavailable(
      f"the C++ compiler $CXX={wanted!r} does not exist"
      if wanted
      else "no C++ compiler (c++ or g++) is installed"
    )
  directory = directory or cache_dir()
  name = library_name(cxx, source)
  path = os.path.join(directory, name)
  if os.path.isfile(path):
    return path
  try:
    os.makedirs(directory, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, prefix=name, suffix=".partial")
    os.close(handle)
  except OSError:
    directory = tempfile.mkdtemp(prefix="learned_opt_kernels_")
    path = os.path.join(directory, name)
    partial = path + ".partial"
  try:
    compile_library(cxx, source, partial)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def register(path: str, symbol: str) -> str:
  """Loads the library at ``path``, registers its handler ``symbol`` on CPU; the target's name.

  Raises:
    KernelUnavailable: the library does not load or has no ``symbol``.
  """
  library_id = os.path.basename(path).removesuffix(".so").replace("-", "_")
  target = f"learned_opt_{library_id}_{symbol}"
  if target not in _REGISTERED:
    try:
      loaded = ctypes.cdll.LoadLibrary(path)
      handler = getattr(loaded, symbol)
    except (OSError, AttributeError) as e:
      raise KernelUnavailable(f"loading the built kernel {path} failed ({e})") from e
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _LIBRARIES.append(loaded)
    _REGISTERED.add(target)
  return target


def targets(source: str, symbols: tuple[str, ...]) -> tuple[str, ...]:
  """The registered FFI targets of ``source``'s handlers ``symbols``, built on first use.

  Memoized per source, compiler and cache directory (so ``$CXX`` or ``$LEARNED_OPT_CACHE`` set
  later are honoured), failures too: a failed build is not retried in this process.

  Raises:
    KernelUnavailable: no compiler, a failed build, or a library that does not load.
  """
  key = (source, symbols, os.environ.get("CXX"), cache_dir())
  with _LOCK:
    if key in _TARGETS:
      return _TARGETS[key]
    if key in _FAILURES:
      raise KernelUnavailable(_FAILURES[key])
    try:
      path = library(source)
      _TARGETS[key] = tuple(register(path, symbol) for symbol in symbols)
    except KernelUnavailable as e:
      _FAILURES[key] = str(e)
      raise
    return _TARGETS[key]


def warn_once(message: str) -> None:
  """A ``RuntimeWarning`` the first time this process sees ``message``."""
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
