"""Test setup: 8 faked CPU devices (as on a small pod slice) before JAX initializes; the learned
optimizer variants and parameters that the contract suite runs every test over, on every backend
(XLA always; the CPU kernels where a C++ compiler exists)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from collections.abc import Callable  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import learned_opt  # noqa: E402
from learned_opt import ntm, parameter_groups  # noqa: E402
from learned_opt.kernels import build as kernel_build  # noqa: E402
from learned_opt.kernels import cache_trust  # noqa: E402


def _persistent_compilation_cache() -> None:
  """JAX's persistent compilation cache for the tests, so a second run of the fast tier compiles
  little (BUILD.md). A cached executable is code that runs, so the cache lives in a private
  directory beside the kernel cache, checked like it (``cache_trust``), and is skipped when that
  directory cannot be had; it keeps at most 2 GB. ``LEARNED_OPT_TEST_COMPILATION_CACHE=0`` turns
  it off."""
  if os.environ.get("LEARNED_OPT_TEST_COMPILATION_CACHE", "1") == "0":
    return
  root = os.path.join(os.path.dirname(kernel_build.cache_dir()), "jax_tests")
  try:
    cache_trust.make_private_dirs(root)
    directory = cache_trust.checked(root)
  except (OSError, cache_trust.UntrustedCache) as e:
    print(f"conftest: no persistent compilation cache: {e}")
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_compilation_cache_max_size", 2 * 1024**3)


_persistent_compilation_cache()


def _own_shape_states(state, params):
  """LSTM: the state is a tree shaped like the parameters."""
  return jax.tree.structure(params).flatten_up_to(state), []


def _ntm_states(state, params):
  """NTM: per-leaf controller (and window) state; the dense memory is shared by all."""
  treedef = jax.tree.structure(params)
  per_leaf = treedef.flatten_up_to(state.controller)
  if isinstance(state.memory, ntm.WindowMemory):
    windows = [treedef.flatten_up_to(m) for m in state.memory]
    return list(zip(per_leaf, *windows, strict=True)), []
  return per_leaf, [state.memory]


def _partition_states(state, params):
  """Partition: ``{label: [state of each leaf of the group]}``, leaves in flattening order."""
  groups = {label: iter(group) for label, group in state.items()}
  labels = [parameter_groups.conv_fc(p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
  return [next(groups[label]) for label in labels], []


class Variant(NamedTuple):
  """One optimizer of the contract suite and what it promises.

  Attributes:
    name: the test id.
    optimizer: the ``LearnedOptimizer``, built for the backend under test (``optimizer.backend``).
    meta_params: its (random) phi.
    coordinatewise: each coordinate's update depends on its own gradients only (section 2.1);
      False where GAC or a shared memory couples the coordinates.
    leaf_states: ``(state, params) -> (per-leaf states, shared arrays)``: the state of each
      parameter leaf in flattening order, and the arrays shared by all coordinates.
  """

  name: str
  optimizer: learned_opt.LearnedOptimizer
  meta_params: Any
  coordinatewise: bool
  leaf_states: Callable


_VARIANTS = {
  "lstm": (lambda: learned_opt.lstm_optimizer(hidden_size=8), True, _own_shape_states),
  "lstm_log_sign": (
    lambda: learned_opt.lstm_optimizer(hidden_size=8, preprocess="log_sign", output_scale=0.1),
    True,
    _own_shape_states,
  ),
  "lstm_scale": (
    lambda: learned_opt.lstm_optimizer(hidden_size=8, preprocess="scale", input_scale=0.1),
    True,
    _own_shape_states,
  ),
  "lstm_gac": (
    lambda: learned_opt.lstm_optimizer(hidden_size=8, global_cells=3),
    False,
    _own_shape_states,
  ),
  "ntm_bfgs": (lambda: learned_opt.ntm_bfgs_optimizer(hidden_size=8), False, _ntm_states),
  "ntm_lbfgs": (
    lambda: learned_opt.ntm_lbfgs_optimizer(hidden_size=8, memory_window=3),
    False,
    _ntm_states,
  ),
  # conv leaves (by name) get a plain LSTM, the rest an LSTM+GAC with its own phi.
  "partition": (
    lambda: learned_opt.partition(
      {
        "conv": learned_opt.lstm_optimizer(hidden_size=4),
        "fc": learned_opt.lstm_optimizer(hidden_size=8, global_cells=2),
      }
    ),
    False,
    _partition_states,
  ),
  # Per-leaf statistics (RMS of g and theta) couple the coordinates of a leaf.
  "per_param_mlp": (
    lambda: learned_opt.per_param_mlp_optimizer(hidden_size=8),
    False,
    _own_shape_states,
  ),
}


# The backends every contract runs on: XLA, what every GPU and TPU user runs, and the CPU kernels.
BACKENDS = ("xla", "cpu_kernels")


def skip_without_kernels(backend: str) -> None:
  """Skips the calling test on ``"cpu_kernels"`` where no C++ compiler can build them."""
  if backend == "cpu_kernels" and kernel_build.compiler() is None:
    pytest.skip("no C++ compiler (c++, g++ or $CXX) to build the CPU kernels")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
  """Each backend, skipped where it cannot run here."""
  skip_without_kernels(request.param)
  return request.param


@pytest.fixture(params=sorted(_VARIANTS))
def variant(request, backend) -> Variant:
  """Every learned optimizer variant on every backend, with random phi (every part random)."""
  make, coordinatewise, leaf_states = _VARIANTS[request.param]
  optimizer = make()
  if backend == "cpu_kernels" and not learned_opt.registry.has_kernel_path(
    optimizer.config.get("kind")
  ):
    pytest.skip(f"{request.param} has no CPU-kernel path")
  optimizer = learned_opt.with_backend(optimizer, backend)
  phi = optimizer.init_meta_params(jax.random.key(0))
  if request.param == "per_param_mlp":  # its read-out starts at zero (Adam): draw one, as trained
    out = jax.random.normal(jax.random.key(1), phi["out"]["w"].shape)
    phi = {**phi, "out": {"w": 0.1 * out, "b": phi["out"]["b"]}}
  return Variant(request.param, optimizer, phi, coordinatewise, leaf_states)


@pytest.fixture
def params():
  """31 parameters in a nested tree; the ``conv`` leaves form the partition's second group."""
  return {
    "conv": {"kernel": jnp.ones((2, 2, 1, 2)), "bias": jnp.zeros((2,))},
    "dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros((4,))},
    # Strong dtypes: optax.apply_updates makes a weakly typed leaf (jnp.array(0.5)) strong, so
    # it would retrace a training step once, with any optax optimizer.
    "scalar": jnp.array(0.5, jnp.float32),
    "nested": [jnp.full((2, 1, 2), -1.0, jnp.float32)],
  }
