"""The coordinatewise LSTM's forward step as one fused CPU kernel (``lstm_step.cc``).

``as_optax(..., kernel="auto")`` runs a plain coordinatewise LSTM (``kind "lstm"``, no global
averaging cells, any preprocessing, size and depth) through this kernel on a CPU backend: one
``jax.ffi.ffi_call`` per parameter leaf, each coordinate's preprocessing, layers, read-out and
output scale in one pass while its state is in L1, on both cores. XLA runs the same math as
separate matmul and element-wise passes over all coordinates, at about 1.5x the CPU time on a
1M-parameter update (BUILD.md, issue 11). The meta-training path (``LearnedOptimizer.update``
under vmap and grad, and ``as_optax``'s default ``kernel="xla"``) never uses it.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``c++`` or
``g++``) into ``$LEARNED_OPT_CACHE/kernels`` (default ``~/.cache/learned_opt/kernels``); the
file name is a hash of the source, the flags, the compiler, jaxlib's version and the CPU's
feature flags (the build targets this CPU), so a cached build is reused only where it fits.
Nothing is built at install time. Without a compiler, after a failed build or on another backend
the update falls back to XLA's, with one warning saying why.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np

from learned_opt.lstm import CoordinateState

KERNELS = ("auto", "xla", "fused")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_step.cc")
CACHE_ENV_VAR = "LEARNED_OPT_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "learned_opt")
BUILD_FLAGS = (
  # Full optimization: the register-tiled loops must be unrolled and kept in registers.
  "-O3",
  # The kernel is compiled on, and only for, the machine that runs it (the cache key holds this
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
PREPROCESS_CODES = {"none": 0, "scale": 1, "log_sign": 2}
BUILD_TIMEOUT_S = 600

_LOCK = threading.Lock()
_TARGETS: dict[tuple, str] = {}  # (compiler, cache dir) -> registered FFI target name
_FAILURES: dict[tuple, str] = {}  # (compiler, cache dir) -> why the kernel is unavailable
_REGISTERED: set[str] = set()
_LIBRARIES: list[ctypes.CDLL] = []  # loaded libraries stay referenced for the process's life
_WARNED: set[str] = set()


class KernelUnavailable(RuntimeError):
  """The fused kernel cannot be built or loaded here; the message says why."""


def unsupported_reason(config) -> str | None:
  """Why the fused kernel cannot run the optimizer with this config, or None if it can."""
  if config.get("kind") != "lstm":
    return f"it runs the coordinatewise LSTM only, and this optimizer is {config.get('kind')!r}"
  if config.get("global_cells", 0):
    return (
      f"it has no global averaging cells, and this LSTM+GAC has {config['global_cells']} "
      "(their mean over all coordinates couples the leaves)"
    )
  if config.get("preprocess", "none") not in PREPROCESS_CODES:
    return f"it knows preprocessing {tuple(PREPROCESS_CODES)}, not {config.get('preprocess')!r}"
  return None


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


def _cpu_features() -> str:
  """This CPU's feature flags (Linux), else its name: what ``-march=native`` compiles for."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return f"{platform.machine()} {platform.processor()}"


def library_name(cxx: str) -> str:
  """The cached library's file name: a hash of everything that shapes the built code."""
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256()
  for part in (source, " ".join(BUILD_FLAGS).encode(), version.encode(), _cpu_features().encode()):
    key.update(part)
    key.update(b"\0")
  key.update(jaxlib.version.__version__.encode())  # the FFI headers and ABI it was built against
  return f"lstm_step-{key.hexdigest()[:20]}.so"


def _compile(cxx: str, output: str) -> None:
  """Compiles ``SOURCE`` into the shared library ``output``; raises ``KernelUnavailable``."""
  command = [cxx, *BUILD_FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", output]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise KernelUnavailable(f"compiling it with {cxx} failed ({e})") from e
  if done.returncode != 0:
    tail = done.stderr.strip().splitlines()[-5:]
    raise KernelUnavailable(
      f"compiling it with {cxx} failed (exit {done.returncode}): " + " | ".join(tail)
    )


def build(cxx: str | None = None, directory: str | None = None) -> str:
  """The path of the compiled kernel, compiling it unless the cache already holds it.

  The library is written to a temporary file and renamed into place, so concurrent processes
  never load a half-written one. A cache directory that cannot be written: built in a temporary
  directory instead (for this process only).

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
  name = library_name(cxx)
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
    _compile(cxx, partial)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def _register(path: str) -> str:
  """Loads the library at ``path`` and registers its handler; returns the FFI target name."""
  target = "learned_opt_" + os.path.basename(path).removesuffix(".so").replace("-", "_")
  if target not in _REGISTERED:
    try:
      library = ctypes.cdll.LoadLibrary(path)
      handler = library.LearnedOptLstmStep
    except (OSError, AttributeError) as e:
      raise KernelUnavailable(f"loading the built kernel {path} failed ({e})") from e
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _LIBRARIES.append(library)
    _REGISTERED.add(target)
  return target


def target() -> str:
  """The registered FFI target of the kernel, built on first use; memoized per compiler and
  cache directory (so ``$CXX`` or ``$LEARNED_OPT_CACHE`` set later are honoured).

  Raises:
    KernelUnavailable: no compiler, a failed build, or a library that does not load.
  """
  key = (os.environ.get("CXX"), cache_dir())
  with _LOCK:
    if key in _TARGETS:
      return _TARGETS[key]
    if key in _FAILURES:
      raise KernelUnavailable(_FAILURES[key])
    try:
      _TARGETS[key] = _register(build())
    except KernelUnavailable as e:
      _FAILURES[key] = str(e)
      raise
    return _TARGETS[key]


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _leaf_step(name, layers, out, grad, state, attributes):
  """The kernel on one leaf: ``(update shaped like grad, CoordinateState)``."""
  shape = jnp.shape(grad)
  rows = math.prod(shape)
  if rows == 0:
    return jnp.zeros(shape, jnp.result_type(grad)), state
  num_layers, hidden = state.hidden.shape[-2:]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  h = f32(state.hidden).reshape(rows, num_layers, hidden)
  c = f32(state.cell).reshape(rows, num_layers, hidden)
  weights = [f32(a) for layer in layers for a in (layer["w"], layer["b"])]
  # No input_output_aliases for the state: with them XLA copied a donated state in and out of
  # the call (four copies, measured in the compiled HLO); fresh output buffers cost none.
  call = jax.ffi.ffi_call(
    name,
    (
      jax.ShapeDtypeStruct((rows,), jnp.float32),
      jax.ShapeDtypeStruct(h.shape, jnp.float32),
      jax.ShapeDtypeStruct(c.shape, jnp.float32),
    ),
    vmap_method="sequential",
  )
  update, h, c = call(
    f32(grad).reshape(rows), h, c, f32(out["w"]), f32(out["b"]), *weights, **attributes
  )
  return (
    update.reshape(shape).astype(jnp.result_type(grad)),
    CoordinateState(
      h.reshape(shape + (num_layers, hidden)), c.reshape(shape + (num_layers, hidden))
    ),
  )


def kernel_attributes(config, threads: int = 0, spawn: bool = False) -> dict:
  """The kernel's attributes for an optimizer config, constants in float32 as XLA uses them."""
  p = np.float32(config.get("preprocess_p", 10.0))
  return {
    "preprocess": np.int32(PREPROCESS_CODES[config.get("preprocess", "none")]),
    "factor": np.float32(config.get("input_scale", 1.0)),
    # preprocess.log_sign's exp(-p) and exp(p), rounded to float32 as XLA folds them.
    "threshold": np.float32(math.exp(-p)),
    "p": p,
    "exp_p": np.float32(math.exp(p)) if p < 88 else np.float32(np.inf),
    "output_scale": np.float32(config.get("output_scale", 1.0)),
    "threads": np.int64(threads),
    "spawn": np.int32(spawn),
  }


def fused_update(config, name: str, meta_params, grads, state, threads: int = 0, spawn=False):
  """``lstm_optimizer(**config).update(meta_params, grads, state)`` by the kernel ``name``.

  Args:
    config: the optimizer's config; ``unsupported_reason(config)`` must be None.
    name: the FFI target, ``target()``.
    meta_params, grads, state: as for ``LearnedOptimizer.update``.
    threads: 0 = XLA's CPU thread pool size, n = n threads in all.
    spawn: run the other threads as fresh ``std::thread`` s, not XLA pool tasks (to compare).
  """
  leaves, treedef = jax.tree.flatten(grads)
  if not leaves:
    return treedef.unflatten([]), treedef.unflatten([])
  states = treedef.flatten_up_to(state)
  attributes = kernel_attributes(config, threads, spawn)
  steps = [
    _leaf_step(name, meta_params["layers"], meta_params["out"], g, s, attributes)
    for g, s in zip(leaves, states, strict=True)
  ]
  return treedef.unflatten([u for u, _ in steps]), treedef.unflatten([s for _, s in steps])


def _not_differentiable(fused):
  """``fused`` that raises a clear error when differentiated (the kernel has no derivative)."""
  update = jax.custom_jvp(fused)

  @update.defjvp
  def jvp(primals, tangents):
    del primals, tangents
    raise ValueError(
      "as_optax(..., kernel='auto' or 'fused') runs the fused LSTM kernel, which has no "
      "derivative; differentiate through as_optax(..., kernel='xla') (the default), as "
      "meta-training does."
    )

  return update


def make_update(optimizer, kernel: str = "auto"):
  """``optimizer.update``, or the same map by the fused kernel where ``kernel`` asks for it.

  Args:
    optimizer: a ``LearnedOptimizer``.
    kernel: ``"xla"`` (``optimizer.update`` itself, nothing built), ``"fused"`` (the kernel;
      falls back to XLA with a warning where it cannot be built, or off CPU) or ``"auto"``
      (the kernel for an optimizer it covers on a CPU backend, silently XLA otherwise; a
      warning if it cannot be built). The kernel's update is not differentiable (a clear
      error under ``jax.grad``); under ``jax.vmap`` it runs one mapped element at a time.

  Raises:
    ValueError: an unknown ``kernel``, or ``"fused"`` for an optimizer the kernel does not cover.
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
  if kernel == "xla":
    return optimizer.update
  reason = unsupported_reason(optimizer.config)
  if reason is not None:
    if kernel == "fused":
      raise ValueError(
        f"kernel='fused' cannot run this optimizer: {reason}. Pass kernel='auto' (the fused "
        "kernel where it applies) or kernel='xla'."
      )
    return optimizer.update
  config = dict(optimizer.config)

  def update(meta_params, grads, state):
    if jax.default_backend() != "cpu":
      if kernel == "fused":
        _warn_once(
          f"kernel='fused' is a CPU kernel and the backend is {jax.default_backend()!r}; "
          "running the XLA update instead. Pass kernel='auto' to choose silently."
        )
      return optimizer.update(meta_params, grads, state)
    try:
      name = target()
    except KernelUnavailable as e:
      _warn_once(
        f"The fused LSTM kernel is unavailable: {e}. Running the XLA update instead (about "
        "1.5x the CPU time on large models); install g++ or set $CXX, or pass kernel='xla' "
        "to silence this."
      )
      return optimizer.update(meta_params, grads, state)
    fused = functools.partial(fused_update, config, name)
    return _not_differentiable(fused)(meta_params, grads, state)

  return update
