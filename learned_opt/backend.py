"""How a learned optimizer's update executes: the backend, an argument chosen when it is built.

* ``"xla"``: XLA's own ops, on any device (CPU, GPU, TPU). Nothing is compiled or loaded.
* ``"cpu_kernels"``: the hand-written C++ stack kernels (``learned_opt.kernels``) for every LSTM
  step on a CPU backend, any number of devices; ``KernelUnavailable`` (saying why and what to
  do) where they cannot be had: no compiler, a failed build, an untrusted cache, another
  platform, or weights that are not float32.
* ``"auto"``: the kernels on a CPU backend with one device where they build, else XLA. Several
  devices also mean XLA: XLA's partitioner knows nothing of a custom call, so it would gather
  the sharded rows and run the kernel on every device over all of them. A failed build falls
  back to XLA with one warning per process.

The tasks' conv layers follow the same setting (``tasks.conv_layers.conv_function("auto")``: the
convolution and batch-norm kernels where this backend would run the CPU kernels), read from
``$LEARNED_OPT_BACKEND`` when a task is built.

``$LEARNED_OPT_BACKEND`` sets the default of a factory's ``backend=None``, read when the
optimizer is built (``default()``), never when a step is traced. ``"fused"`` is an accepted,
deprecated spelling of ``"cpu_kernels"``; ``$LEARNED_OPT_GATES``, a deprecated spelling of the
variable.

Both backends compute the same math; results agree to ~1e-6 (the kernels' polynomial exp), not
bit for bit. The kernels are ``custom_vjp`` s, so under ``"cpu_kernels"`` (and ``"auto"`` where
it picks them) the update has no forward-mode derivative (``jax.jvp``); use ``"xla"`` for that.

Example:
  >>> opt = learned_opt.lstm_optimizer(backend="xla")          # any device, nothing compiled
  >>> tx = learned_opt.as_optax(saved, backend="cpu_kernels")  # insists on the kernels
"""

import contextlib
import contextvars
import os
import warnings

import jax
import jax.numpy as jnp

from learned_opt.kernels import loading, stack
from learned_opt.kernels.build import KernelUnavailable

BACKENDS = ("auto", "xla", "cpu_kernels")
ALIASES = {"fused": "cpu_kernels"}  # deprecated spellings
ENV_VAR = "LEARNED_OPT_BACKEND"
OLD_ENV_VAR = "LEARNED_OPT_GATES"  # deprecated
_FALLBACK_WARNING = "auto_fallback"

__all__ = [
  "BACKENDS",
  "KernelUnavailable",
  "checked",
  "default",
  "gradient_of_vmapped",
  "kernel_targets",
  "twice_differentiable",
]

# Set while a function that will be differentiated twice is traced (``twice_differentiable``).
_TWICE = contextvars.ContextVar("learned_opt_twice_differentiable", default=False)


@contextlib.contextmanager
def twice_differentiable():
  """Traces inside it run XLA's ops where ``"auto"`` would run a kernel.

  A kernel is a ``custom_vjp`` whose backward pass is a custom call without a derivative, so a
  function differentiated twice (a second-order meta-gradient through the optimizee's gradient,
  ``train.inner.gradient``) cannot contain one. ``"cpu_kernels"`` inside it raises
  ``KernelUnavailable``.
  """
  token = _TWICE.set(True)
  try:
    yield
  finally:
    _TWICE.reset(token)


# Set while a gradient of a function vmapped over problems is traced (``gradient_of_vmapped``).
_SUMMED = contextvars.ContextVar("learned_opt_gradient_of_vmapped", default=False)


@contextlib.contextmanager
def gradient_of_vmapped():
  """Traces inside it take gradients of functions vmapped over problems that share the
  meta-parameters (``jax.grad(jax.vmap(f))``, as ``train.meta_step``'s meta-gradient), never a
  vmapped gradient (``jax.vmap(jax.grad(f))``).

  The kernels' backward passes under ``jax.vmap`` then return the shared weights' cotangents
  summed over the mapped axis, which is what autodiff does next with them, instead of one per
  problem: for 128 quadratics of 10 coordinates those are 7x the optimizer's state a step, and
  made the meta-step ~1.6x slower. Outside it a vmapped gradient is each problem's own.
  """
  token = _SUMMED.set(True)
  try:
    yield
  finally:
    _SUMMED.reset(token)


def checked(backend: str, where: str = "backend") -> str:
  """``backend`` spelled canonically; a ``ValueError`` naming the choices for anything else.

  Args:
    backend: one of ``BACKENDS`` (or a deprecated alias, with a ``DeprecationWarning``).
    where: how the caller names the setting, for the message (``"--backend"``, ``"kernel"``).
  """
  if isinstance(backend, str) and backend.strip().lower() in ALIASES:
    new = ALIASES[backend.strip().lower()]
    warnings.warn(
      f"{where}={backend!r} is deprecated; spell it {new!r}.", DeprecationWarning, stacklevel=3
    )
    return new
  if not isinstance(backend, str) or backend.strip().lower() not in BACKENDS:
    raise ValueError(
      f"{where} must be one of {', '.join(BACKENDS)}, got {backend!r}; 'auto' runs the CPU "
      "kernels on a one-device CPU where they build and XLA elsewhere."
    )
  return backend.strip().lower()


def default() -> str:
  """``$LEARNED_OPT_BACKEND`` (or the deprecated ``$LEARNED_OPT_GATES``), else ``"auto"``.

  Read when an optimizer is built with ``backend=None``, never inside a traced step.
  """
  for name in (ENV_VAR, OLD_ENV_VAR):
    value = os.environ.get(name, "").strip()
    if value:
      if name == OLD_ENV_VAR:
        warnings.warn(
          f"${OLD_ENV_VAR} is deprecated; set ${ENV_VAR} (auto, xla or cpu_kernels) instead.",
          DeprecationWarning,
          stacklevel=3,
        )
      return checked(value, f"${name}")
  return "auto"


def resolve(backend: str | None) -> str:
  """``checked(backend)``, or ``default()`` for None: what a factory records."""
  return default() if backend is None else checked(backend)


def kernel_targets(backend: str, *arrays, family=stack.targets) -> tuple[str, ...] | None:
  """A kernel family's FFI targets if this trace runs them, else None.

  Called when a step is traced: it looks at the platform, the device count and the arrays'
  dtype, and builds the kernels on first use (cached across processes). Inside
  ``gradient_of_vmapped`` the targets end with ``stack.SUM_OVER_VMAP``.

  Args:
    backend: a ``checked`` backend.
    *arrays: pytrees of the arrays the kernels would take (weights, inputs, state).
    family: the family's ``targets`` function: the LSTM's ``stack.targets`` (default), the
      convolution's ``conv.targets`` or the conv layers' tail's ``bn_pool.targets``.

  Raises:
    KernelUnavailable: ``"cpu_kernels"`` where the kernels cannot run; the message says why and
      what to do.
  """
  if backend == "xla" or (backend == "auto" and _TWICE.get()):
    return None
  if _TWICE.get():
    raise KernelUnavailable(
      "backend='cpu_kernels' in a function differentiated twice (a second-order meta-gradient): "
      "the kernels' backward passes have no derivative; pass backend='auto' or 'xla'."
    )
  leaves = jax.tree.leaves(arrays)
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  platform = jax.default_backend()
  if backend == "auto":
    if platform != "cpu" or jax.device_count() > 1 or dtype != jnp.float32:
      return None
    try:
      return _marked(family())
    except KernelUnavailable as e:
      loading.warn_once(
        _FALLBACK_WARNING,
        f"backend='auto': the CPU kernels are unavailable ({e}); running XLA instead. Pass "
        "backend='xla' (or set LEARNED_OPT_BACKEND=xla) to silence this.",
      )
      return None
  fix = "pass backend='auto' (XLA where the kernels cannot run) or backend='xla'"
  if platform != "cpu":
    raise KernelUnavailable(
      f"backend='cpu_kernels' runs on a CPU backend and this one is {platform!r}; {fix}."
    )
  if dtype != jnp.float32:
    raise KernelUnavailable(
      f"backend='cpu_kernels' computes in float32 and the optimizer's weights or state are "
      f"{dtype}; {fix}."
    )
  try:
    return _marked(family())
  except KernelUnavailable as e:
    raise KernelUnavailable(
      f"backend='cpu_kernels': the CPU kernels are unavailable: {e}. Fix that, or {fix}."
    ) from e


def _marked(targets: tuple[str, ...]) -> tuple[str, ...]:
  """``targets``, and inside ``gradient_of_vmapped`` the marker that tells the kernels' vmap
  rules to sum shared weights' cotangents (``stack.SUM_OVER_VMAP``, last: the targets are
  indexed from the front). Part of the static arguments, so JAX's trace caches tell the two
  apart."""
  return targets + (stack.SUM_OVER_VMAP,) if _SUMMED.get() else targets
