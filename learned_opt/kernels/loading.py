"""Loading a built kernel library (``build``) into this process and registering its handlers.

``register(path, symbol)`` loads a built library once per process and registers one of its
handlers as a CPU FFI target; ``targets(source, symbols)`` builds (``build.built``) and
registers, memoized per source, compiler and cache directory. What is loaded is checked as
``build``'s module docstring says: the bytes that were verified, from a private copy.
"""

import ctypes
import os
import shutil
import tempfile
import threading
import warnings

import jax

from learned_opt import tree_files
from learned_opt.kernels import build
from learned_opt.kernels.build import KernelUnavailable, unavailable_if_untrusted
from learned_opt.kernels.cache_trust import SIDECAR_SUFFIX, UntrustedCache, checked, verified

_REGISTERED: set[str] = set()
_LIBRARIES: dict[str, ctypes.CDLL] = {}  # SHA-256 -> loaded library, kept for the process's life
_LOCK = threading.Lock()
_TARGETS: dict[tuple, tuple[str, ...]] = {}  # (source, symbols, compiler, cache) -> targets
_FAILURES: dict[tuple, str] = {}  # the same key -> why the kernel is unavailable
_WARNED: set[str] = set()


def scratch(directory: str) -> str:
  """A fresh private (0o700) directory to load a copy from: in ``directory`` (the cache, whose
  disk already runs kernels, where ``/tmp`` may be mounted noexec), else the system's.

  Raises:
    UntrustedCache: it is not private (``checked``).
  """
  try:
    made = tempfile.mkdtemp(prefix=".load-", dir=directory)
  except OSError:
    made = tempfile.mkdtemp(prefix="learned_opt_load_")
  try:
    return checked(made)
  except UntrustedCache:
    shutil.rmtree(made, ignore_errors=True)
    raise


@unavailable_if_untrusted
def load(path: str, content: bytes | None = None) -> ctypes.CDLL:
  """The library at ``path`` loaded, once per process; ``content`` its verified bytes if known.

  dlopen runs the bytes that were hashed, not whatever ``path`` holds by then: they are written
  to a new file in a fresh private directory (``scratch``) that only this process writes,
  loaded from there, and the copy removed. Simpler than loading ``/proc/self/fd/N`` of the
  checked descriptor, which is Linux only, and which glibc would match by name against a
  library already loaded from a since-reused descriptor number.

  Raises:
    KernelUnavailable: ``path``'s directory is not private, or the library is missing, does not
      match its sidecar, is not trusted or does not load.
  """
  directory = checked(os.path.dirname(os.path.abspath(path)))
  if content is None:
    content = verified(path)
    if content is None:
      raise KernelUnavailable(
        f"the cached kernel {path} is missing or does not match the SHA-256 in "
        f"{path}{SIDECAR_SUFFIX}; build it first (build.library())"
      )
  key = tree_files.sha256(content)
  if key in _LIBRARIES:
    return _LIBRARIES[key]
  private = scratch(directory)
  copy = os.path.join(private, os.path.basename(path))
  try:
    handle = os.open(
      copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o700
    )
    with os.fdopen(handle, "wb") as f:
      f.write(content)
    _LIBRARIES[key] = ctypes.CDLL(copy)
  except OSError as e:
    raise KernelUnavailable(f"loading the built kernel {path} failed ({e})") from e
  finally:
    shutil.rmtree(private, ignore_errors=True)
  return _LIBRARIES[key]


def register(path: str, symbol: str, content: bytes | None = None) -> str:
  """Loads the library at ``path`` (``load``), registers its handler ``symbol`` on CPU; the
  target's name.

  Raises:
    KernelUnavailable: the library does not verify or load (``load``), or has no ``symbol``.
  """
  library_id = os.path.basename(path).removesuffix(".so").replace("-", "_")
  target = f"learned_opt_{library_id}_{symbol}"
  if target not in _REGISTERED:
    loaded = load(path, content)
    try:
      handler = getattr(loaded, symbol)
    except AttributeError as e:
      raise KernelUnavailable(f"loading the built kernel {path} failed ({e})") from e
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _REGISTERED.add(target)
  return target


def targets(source: str, symbols: tuple[str, ...]) -> tuple[str, ...]:
  """The registered FFI targets of ``source``'s handlers ``symbols``, built on first use.

  Memoized per source, compiler and cache directory (so ``$CXX`` or ``$LEARNED_OPT_CACHE`` set
  later are honoured), failures too: a failed build is not retried in this process.

  Raises:
    KernelUnavailable: no compiler, a failed build, a cache that is not trusted, or a library
      that does not load.
  """
  key = (source, symbols, os.environ.get("CXX"), build.cache_dir())
  with _LOCK:
    if key in _TARGETS:
      return _TARGETS[key]
    if key in _FAILURES:
      raise KernelUnavailable(_FAILURES[key])
    try:
      path, content = build.built(source)
      _TARGETS[key] = tuple(register(path, symbol, content) for symbol in symbols)
    except KernelUnavailable as e:
      _FAILURES[key] = str(e)
      raise
    return _TARGETS[key]


def warn_once(key: str, message: str) -> None:
  """A ``RuntimeWarning`` with ``message`` the first time this process warns about ``key``."""
  if key not in _WARNED:
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
