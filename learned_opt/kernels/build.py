"""Compiling a C++ XLA FFI kernel for this CPU on first use, cached (``loading`` loads it).

``library(source)`` compiles ``source`` with the system C++ compiler (``$CXX``, else ``c++`` or
``g++``) into ``$LEARNED_OPT_CACHE/kernels`` (default ``~/.cache/learned_opt/kernels``). The
file name is a hash of the source and the headers beside it, the flags, the compiler, jaxlib's
version and the CPU's feature flags (the build targets this CPU), so a cached build is reused
only where it fits. Nothing is built at install time. ``learned_opt.kernels.loading`` loads a
built library and registers its handlers as CPU FFI targets.

Loading a library runs its code, so the cache trusts only what no other user could have written
(``learned_opt.kernels.cache_trust``): a library that is missing, truncated or does not match the
SHA-256 recorded beside it is rebuilt; one whose owner or permissions are wrong, or a cache
directory that is not private, is refused (``KernelUnavailable``, saying how to fix it).
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jaxlib.version

from learned_opt import tree_files
from learned_opt.kernels.cache_trust import (
  CACHE_ENV_VAR,
  READ_FLAGS,
  SIDECAR_SUFFIX,
  UntrustedCache,
  private_directory,
  verified,
)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "learned_opt")
LIBRARY_MODE = 0o755
SIDECAR_MODE = 0o644
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


class KernelUnavailable(RuntimeError):
  """A kernel cannot be built or loaded here; the message says why."""


def unavailable_if_untrusted(fn):
  """``fn`` raising ``KernelUnavailable`` where the cache is not trusted (``UntrustedCache``)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UntrustedCache as e:
      raise KernelUnavailable(str(e)) from e

  return wrapped


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


def library_name(cxx: str, source: str, flags: tuple[str, ...] = BUILD_FLAGS) -> str:
  """The cached library's file name: the source's stem and a hash of all that shapes the code
  (the source and the headers beside it, the flags, the compiler, jaxlib and this CPU)."""
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
  key = hashlib.sha256()
  for path in (source, *headers(source)):
    with open(path, "rb") as f:
      key.update(f.read())
    key.update(b"\0")
  for part in (" ".join(flags).encode(), version.encode(), cpu_features().encode()):
    key.update(part)
    key.update(b"\0")
  key.update(jaxlib.version.__version__.encode())  # the FFI headers and ABI it was built against
  stem = os.path.splitext(os.path.basename(source))[0]
  return f"{stem}-{key.hexdigest()[:20]}.so"


def compile_library(
  cxx: str, source: str, output: str, flags: tuple[str, ...] = BUILD_FLAGS
) -> None:
  """Compiles ``source`` into the shared library ``output``; raises ``KernelUnavailable``.

  Says so on stderr (a build takes seconds to a minute, and looks like a hang otherwise).
  """
  command = [cxx, *flags, "-I", jax.ffi.include_dir(), source, "-o", output]
  where = os.path.dirname(os.path.abspath(output))
  print(
    f"learned_opt: building the CPU kernel {os.path.basename(source)} (first use, cached in "
    f"{where}) ...",
    file=sys.stderr,
    flush=True,
  )
  started = time.monotonic()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise KernelUnavailable(f"compiling it with {cxx} failed ({e})") from e
  if done.returncode != 0:
    tail = done.stderr.strip().splitlines()[-5:]
    raise KernelUnavailable(
      f"compiling it with {cxx} failed (exit {done.returncode}): " + " | ".join(tail)
    )
  print(
    f"learned_opt: built {os.path.basename(source)} in {time.monotonic() - started:.0f} s",
    file=sys.stderr,
    flush=True,
  )


def fsync_directory(directory: str) -> None:
  """Makes renames in ``directory`` durable, where the system allows (best effort)."""
  try:
    handle = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(handle)
  except OSError:
    pass
  finally:
    os.close(handle)


def synced(path: str, mode: int) -> bytes:
  """The bytes of the file ``path`` we just wrote, flushed to disk, its mode set to ``mode``."""
  handle = os.open(path, READ_FLAGS)
  with os.fdopen(handle, "rb") as f:
    os.fsync(f.fileno())
    os.fchmod(f.fileno(), mode)
    return f.read()


def write_sidecar(directory: str, name: str, content: bytes) -> str:
  """Writes ``content``'s SHA-256 to a new file beside ``name``, synced; its temporary path."""
  handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}{SIDECAR_SUFFIX}.")
  with os.fdopen(handle, "w") as f:
    f.write(f"{tree_files.sha256(content)}  {name}\n")  # `sha256sum -c NAME.so.sha256` checks it
    f.flush()
    os.fsync(f.fileno())
    os.fchmod(f.fileno(), SIDECAR_MODE)
  return partial


def install(directory: str, name: str, partial: str) -> bytes:
  """Moves the built library ``partial`` to ``directory/name`` with its sidecar; its bytes.

  Both are synced before they are renamed. The sidecar goes first and the library last: a
  process killed between the two leaves a missing or a stale library, whose bytes do not match
  the new sidecar, so the next process rebuilds it; a library is only ever loaded beside a
  sidecar recording its own hash.
  """
  content = synced(partial, LIBRARY_MODE)
  if not content:
    raise KernelUnavailable(f"the compiler wrote an empty library for {name}")
  path = os.path.join(directory, name)
  sidecar = write_sidecar(directory, name, content)
  try:
    os.replace(sidecar, path + SIDECAR_SUFFIX)
  finally:
    if os.path.exists(sidecar):
      os.remove(sidecar)
  os.replace(partial, path)
  fsync_directory(directory)
  return content


def build(
  cxx: str, source: str, directory: str, name: str, flags: tuple[str, ...] = BUILD_FLAGS
) -> tuple[str, bytes]:
  """Compiles ``source`` into ``directory/name``; its path and bytes.

  A directory that cannot be written: built in a fresh temporary one (this process only).
  """
  try:
    handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
  except OSError:
    directory = os.path.realpath(tempfile.mkdtemp(prefix="learned_opt_kernels_"))
    handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
  os.close(handle)
  try:
    compile_library(cxx, source, partial, flags)
    return os.path.join(directory, name), install(directory, name, partial)
  except OSError as e:  # a full disk, say: as unavailable as a failed build
    raise KernelUnavailable(f"installing the built kernel in {directory} failed ({e})") from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@unavailable_if_untrusted
def built(
  source: str,
  cxx: str | None = None,
  directory: str | None = None,
  flags: tuple[str, ...] = BUILD_FLAGS,
) -> tuple[str, bytes]:
  """``source`` compiled with ``flags``: the library's path and its verified bytes, built unless
  cached (``.ci/kernels`` passes sanitizer and fixed-ISA flags).

  Raises:
    KernelUnavailable: no compiler, a failed build, a cache directory another user could write
      into, or a cached library or sidecar that is not trusted.
  """
  cxx = cxx or compiler()
  if cxx is None:
    wanted = os.environ.get("CXX")
    raise KernelUnavailable(
      f"the C++ compiler $CXX={wanted!r} does not exist; set $CXX to an installed one"
      if wanted
      else "no C++ compiler (c++ or g++) is installed; install g++ or set $CXX to one"
    )
  name = library_name(cxx, source, flags)
  directory = private_directory(directory or cache_dir())
  path = os.path.join(directory, name)
  content = verified(path)
  if content is not None:
    return path, content
  return build(cxx, source, directory, name, flags)


def library(source: str, cxx: str | None = None, directory: str | None = None) -> str:
  """The path of ``source`` compiled, compiling it unless the cache already holds it.

  The library is written to a temporary file, synced and renamed into place after its sidecar
  (``install``), so no process loads a half-written one. A cache directory that cannot be
  written: built in a temporary directory instead (for this process only). What the cache
  trusts: the module's docstring.

  Args:
    source: the C++ file.
    cxx: the compiler; default ``compiler()``.
    directory: the cache; default ``cache_dir()``.

  Raises:
    KernelUnavailable: as ``built``.
  """
  return built(source, cxx, directory)[0]
