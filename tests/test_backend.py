"""The backend is an argument (learned_opt/backend.py): what each choice runs, builds and raises."""

import functools
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import backend as backend_lib
from learned_opt.kernels import build, loading, stack

needs_compiler = pytest.mark.skipif(
  build.compiler() is None, reason="no C++ compiler (c++, g++ or $CXX) to build the CPU kernels"
)
RTOL, ATOL = 1e-5, 2e-6  # the kernels' polynomial exp against XLA's, over a few steps
STACK_SOURCE = stack.SOURCES[1][0]


def _phi(opt, seed=0):
  """Random phi with biases and read-out large enough that every gate is exercised."""
  phi = opt.init_meta_params(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(phi)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten(
    [a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
  )


def _grads(key):
  """Gradients of mixed magnitude: a scalar, 185 rows and 1031 rows (several chunks)."""
  shapes = {"scalar": (), "matrix": (37, 5), "long": (1031,)}
  out = {}
  for name, shape in shapes.items():
    key, k1, k2 = jax.random.split(key, 3)
    magnitude = 10.0 ** jax.random.uniform(k2, shape, minval=-6.0, maxval=1.0)
    out[name] = jax.random.normal(k1, shape) * magnitude
  return out


def _assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def _quadratic_trajectory(tx, steps=8):
  """Parameters after each of ``steps`` jitted updates of ``tx`` on a fixed 300-d quadratic."""
  k1, k2 = jax.random.split(jax.random.key(7))
  w = jax.random.normal(k1, (20, 300)) / 10
  y = jax.random.normal(k2, (20,))
  params = {"theta": jnp.ones((300,)), "bias": jnp.zeros(())}
  loss = lambda p: jnp.sum((w @ p["theta"] + p["bias"] - y) ** 2)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state, path = tx.init(params), []
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
    path.append(params)
  return path, float(loss(params)), float(loss({"theta": jnp.ones((300,)), "bias": 0.0}))


@needs_compiler
def test_cpu_kernels_follow_the_xla_trajectory():
  saved = learned_opt.pretrained("quadratic")
  xla_path, xla_loss, start = _quadratic_trajectory(learned_opt.as_optax(saved, backend="xla"))
  tx = learned_opt.as_optax(saved, backend="cpu_kernels")
  kernel_path, kernel_loss, _ = _quadratic_trajectory(tx)
  for kernel, xla in zip(kernel_path, xla_path, strict=True):
    _assert_trees_close(kernel, xla)
  assert kernel_loss == pytest.approx(xla_loss, rel=1e-4)
  assert kernel_loss < start  # the optimizer does something on this problem


@needs_compiler
def test_the_in_place_state_update_leaves_an_undonated_state_intact():
  # The forward kernel writes the new state over its input (input_output_aliases): with the
  # state donated XLA hands it the donated buffers; without, it must copy first, never clobber.
  opt = learned_opt.lstm_optimizer(preprocess="log_sign", backend="cpu_kernels")
  phi = _phi(opt)
  tx = learned_opt.as_optax(opt, phi)
  grads = _grads(jax.random.key(4))
  state = tx.update(grads, tx.init(grads))[1]  # a nonzero LSTM state
  before = [np.array(a) for a in jax.tree.leaves(state)]
  step = lambda s, g: tx.update(g, s)
  kept = jax.jit(step)(state, grads)
  for a, b in zip(jax.tree.leaves(state), before, strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  donated = jax.jit(step, donate_argnums=(0,))(jax.tree.map(jnp.copy, state), grads)
  for a, b in zip(jax.tree.leaves(donated), jax.tree.leaves(kept), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  xla = learned_opt.as_optax(opt, phi, backend="xla")
  _assert_trees_close(kept, jax.jit(lambda s, g: xla.update(g, s))(state, grads))


@needs_compiler
def test_differentiating_the_kernels_agrees_with_xla():
  opt = learned_opt.lstm_optimizer(preprocess="log_sign")
  phi = _phi(opt)
  grads = _grads(jax.random.key(6))
  state = opt.init_state(phi, grads)

  def loss(backend, phi, g):
    updates, new_state = learned_opt.as_optax(opt, phi, backend=backend).update(
      g, learned_opt.LearnedOptaxState(state)
    )
    squares = sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))
    return squares + 0.1 * sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(new_state))

  for argnum in (0, 1):  # phi, the optimizee gradient
    expected = jax.jit(jax.grad(functools.partial(loss, "xla"), argnum))(phi, grads)
    actual = jax.jit(jax.grad(functools.partial(loss, "cpu_kernels"), argnum))(phi, grads)
    # log_sign's derivative, 1 / (p g), turns float32 rounding into large absolute differences.
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
      scale = float(jnp.max(jnp.abs(e)))
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.parametrize(
  "make",
  [
    lambda b: learned_opt.lstm_optimizer(hidden_size=4, backend=b),
    lambda b: learned_opt.lstm_optimizer(hidden_size=4, global_cells=2, backend=b),
    lambda b: learned_opt.ntm_lbfgs_optimizer(hidden_size=4, global_cells=2, backend=b),
  ],
  ids=["lstm", "lstm_gac", "ntm_lbfgs"],
)
def test_xla_compiles_no_cpp(make, tmp_path, monkeypatch):
  """backend='xla' builds and loads nothing: an empty cache stays empty, under grad and vmap."""
  cache = tmp_path / "cache"
  monkeypatch.setenv(build.CACHE_ENV_VAR, str(cache))
  monkeypatch.setattr(jax, "device_count", lambda *args: 1)  # where auto would build

  def refuse(*args, **kwargs):
    raise AssertionError("backend='xla' must not build or load a kernel")

  for name in ("compile_library", "library", "built"):
    monkeypatch.setattr(build, name, refuse)
  for name in ("load", "register", "targets"):
    monkeypatch.setattr(loading, name, refuse)
  opt = make("xla")
  phi = opt.init_meta_params(jax.random.key(0))
  tx = learned_opt.as_optax(opt, phi)
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
  loss = lambda phi, g: jnp.sum(jax.tree.leaves(opt.update(phi, g, opt.init_state(phi, g)))[0])
  jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(phi, jax.tree.map(lambda p: p[None], params))
  updates, _ = jax.jit(tx.update)(params, tx.init(params))
  assert updates["w"].shape == (3, 2)
  assert not cache.exists() or not os.listdir(cache)


def test_without_a_compiler_auto_warns_once_and_equals_xla(monkeypatch):
  monkeypatch.setenv("CXX", "/nonexistent/c++")
  monkeypatch.setattr(loading, "_WARNED", set())
  monkeypatch.setattr(jax, "device_count", lambda *args: 1)  # where auto uses the kernels
  opt = learned_opt.lstm_optimizer(backend="auto")
  phi = _phi(opt)
  params = {"w": jnp.zeros((40,))}
  grads = {"w": jax.random.normal(jax.random.key(1), (40,))}
  auto = learned_opt.as_optax(opt, phi)
  with pytest.warns(RuntimeWarning, match=r"auto.*unavailable.*\$CXX='/nonexistent/c\+\+'") as seen:
    got, _ = jax.jit(auto.update)(grads, auto.init(params))
    jax.jit(jax.grad(lambda p, g: jnp.sum(opt.update(p, g, opt.init_state(p, g))[0]["w"])))(
      phi, grads
    )
  assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1  # one, not two
  xla = learned_opt.as_optax(opt, phi, backend="xla")
  expected, _ = jax.jit(xla.update)(grads, xla.init(params))
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(expected["w"]))  # XLA's own
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a second trace warns no more
    jax.jit(lambda g, s: auto.update(g, s))(grads, auto.init(params))


def test_cpu_kernels_insist_without_a_compiler_or_off_cpu(monkeypatch):
  monkeypatch.setenv("CXX", "/nonexistent/c++")
  opt = learned_opt.lstm_optimizer(hidden_size=4, backend="cpu_kernels")
  phi = opt.init_meta_params(jax.random.key(0))
  params = {"w": jnp.zeros((5,))}
  with pytest.raises(
    learned_opt.KernelUnavailable, match=r"cpu_kernels.*nonexistent.*backend='auto'.*'xla'"
  ):
    jax.jit(opt.update)(phi, params, opt.init_state(phi, params))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(learned_opt.KernelUnavailable, match=r"CPU backend and this one is 'gpu'"):
    jax.jit(opt.update)(phi, params, opt.init_state(phi, params))
  auto = learned_opt.with_backend(opt, "auto")  # quietly XLA off CPU
  jax.jit(auto.update)(phi, params, auto.init_state(phi, params))


def test_backend_names_aliases_and_errors(monkeypatch):
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  phi = opt.init_meta_params(jax.random.key(0))
  with pytest.raises(ValueError, match="backend must be one of auto, xla, cpu_kernels"):
    learned_opt.as_optax(opt, phi, backend="fast")
  with pytest.raises(ValueError, match="backend must be one of"):
    learned_opt.lstm_optimizer(backend="gpu")
  with pytest.warns(DeprecationWarning, match=r"kernel=\.\.\.\) is deprecated"):
    tx = learned_opt.as_optax(opt, phi, kernel="xla")
  del tx
  with pytest.warns(DeprecationWarning, match="'fused' is deprecated; spell it 'cpu_kernels'"):
    assert backend_lib.checked("fused") == "cpu_kernels"
  with pytest.raises(TypeError, match="backend and its deprecated spelling kernel"):
    learned_opt.as_optax(opt, phi, backend="xla", kernel="xla")
  # A partition passes its backend to every group.
  groups = learned_opt.partition({"conv": opt, "fc": opt})
  assert learned_opt.with_backend(groups, "xla").backend == "xla"


def test_the_environment_sets_the_default_when_built_never_when_traced(monkeypatch):
  monkeypatch.setenv(backend_lib.ENV_VAR, "xla")
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  assert opt.backend == "xla" and learned_opt.build(opt.config).backend == "xla"
  monkeypatch.setenv(backend_lib.ENV_VAR, "cpu_kernels")  # after building: no effect
  monkeypatch.setenv("CXX", "/nonexistent/c++")  # cpu_kernels would raise here
  phi = opt.init_meta_params(jax.random.key(0))
  params = {"w": jnp.zeros((3,))}
  jax.jit(opt.update)(phi, params, opt.init_state(phi, params))
  monkeypatch.setenv(backend_lib.ENV_VAR, "sometimes")
  with pytest.raises(ValueError, match=r"\$LEARNED_OPT_BACKEND must be one of"):
    learned_opt.lstm_optimizer()
  monkeypatch.setenv(backend_lib.ENV_VAR, "cpu_kernels")  # kinds without kernels ignore it

  def xla_only(hidden_size: int = 2):  # a kind whose factory takes no backend
    return learned_opt.lstm_optimizer(hidden_size=hidden_size, backend="xla")

  monkeypatch.setitem(learned_opt.registry._FACTORIES, "xla_only", xla_only)  # noqa: SLF001
  assert learned_opt.build({"kind": "xla_only"}).backend == "auto"
  with pytest.raises(ValueError, match="kind 'xla_only' has no CPU-kernel path"):
    learned_opt.build({"kind": "xla_only"}, backend="cpu_kernels")
  monkeypatch.delenv(backend_lib.ENV_VAR)
  monkeypatch.setenv(backend_lib.OLD_ENV_VAR, "fused")
  with pytest.warns(DeprecationWarning) as caught:  # the variable's name and its old spelling
    assert learned_opt.lstm_optimizer().backend == "cpu_kernels"
  messages = [str(w.message) for w in caught]
  assert any("LEARNED_OPT_GATES is deprecated" in m for m in messages), messages
  assert any("'fused' is deprecated" in m for m in messages), messages


def test_loading_chooses_the_backend(tmp_path):
  opt = learned_opt.lstm_optimizer(hidden_size=4, backend="xla")
  learned_opt.save(str(tmp_path), opt, opt.init_meta_params(jax.random.key(0)))
  assert learned_opt.load(str(tmp_path), backend="xla").optimizer.backend == "xla"
  assert learned_opt.load(str(tmp_path), backend="cpu_kernels").optimizer.backend == "cpu_kernels"
  with pytest.raises(ValueError, match="backend must be one of"):
    learned_opt.load(str(tmp_path), backend="gpu")


# --- Building and loading ---------------------------------------------------------------------


def test_build_is_cached_atomic_and_survives_an_unwritable_cache(tmp_path, monkeypatch):
  compiled = []

  def fake_compile(cxx, source, output, flags=build.BUILD_FLAGS):
    compiled.append(output)
    assert source == STACK_SOURCE
    assert output.endswith(".partial")  # written beside the final name, then renamed
    with open(output, "wb") as f:
      f.write(b"library")

  monkeypatch.setattr(build, "compile_library", fake_compile)
  monkeypatch.setattr(build, "library_name", lambda cxx, source, flags: "lstm_stack-test.so")
  cxx = build.compiler() or "c++"
  path = build.library(STACK_SOURCE, cxx, str(tmp_path / "cache"))
  assert path == str(tmp_path / "cache" / "lstm_stack-test.so") and len(compiled) == 1
  again = build.library(STACK_SOURCE, cxx, str(tmp_path / "cache"))
  assert again == path and len(compiled) == 1  # reused
  # No partial file left; the library's SHA-256 beside it.
  assert sorted(os.listdir(tmp_path / "cache")) == [
    "lstm_stack-test.so",
    "lstm_stack-test.so.sha256",
  ]
  (tmp_path / "file").write_text("not a directory")
  elsewhere = build.library(STACK_SOURCE, cxx, str(tmp_path / "file" / "cache"))
  assert os.path.isfile(elsewhere) and not elsewhere.startswith(str(tmp_path))
  shutil.rmtree(os.path.dirname(elsewhere))


@needs_compiler
def test_failed_build_leaves_nothing_and_says_why(tmp_path, capfd):
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(build.KernelUnavailable, match="compiling it with .* failed"):
    build.library(str(broken), build.compiler(), str(tmp_path / "cache"))
  assert os.listdir(tmp_path / "cache") == []
  assert "building the CPU kernel broken.cc (first use, cached in" in capfd.readouterr().err


@needs_compiler
def test_a_library_without_the_handler_is_a_clear_error():
  stack.targets()
  path = build.library(STACK_SOURCE)  # the module's build, found in the cache
  with pytest.raises(build.KernelUnavailable, match="loading the built kernel .* failed"):
    loading.register(path, "NoSuchHandler")


@needs_compiler
def test_library_name_depends_on_source_flags_and_cpu(tmp_path, monkeypatch):
  cxx = build.compiler()
  base = build.library_name(cxx, STACK_SOURCE)
  assert base == build.library_name(cxx, STACK_SOURCE) and base.startswith("lstm_stack-")
  edited = tmp_path / "lstm_stack.cc"
  edited.write_bytes(open(STACK_SOURCE, "rb").read() + b"// edited\n")
  changed_source = build.library_name(cxx, str(edited))
  flagged = build.library_name(cxx, STACK_SOURCE, build.BUILD_FLAGS + ("-g",))
  monkeypatch.setattr(build, "cpu_features", lambda: "another cpu")
  names = {base, changed_source, flagged, build.library_name(cxx, STACK_SOURCE)}
  assert len(names) == 4


def test_a_run_config_chooses_the_backend(tmp_path):
  """MetaTrainConfig.backend (--backend) is validated, recorded in config.json and builds the
  optimizer the run trains."""
  from train import trainer
  from train.config import MetaTrainConfig

  with pytest.raises(ValueError, match=r"--backend='gpu' is unknown.*auto, xla, cpu_kernels"):
    MetaTrainConfig(output_dir=str(tmp_path), backend="gpu")
  config = MetaTrainConfig(output_dir=str(tmp_path), backend="xla")
  assert '"backend": "xla"' in config.to_json()
  assert trainer.build(config)[1].backend == "xla"
