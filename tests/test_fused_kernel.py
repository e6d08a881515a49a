"""The fused CPU kernel of the LSTM's forward step (learned_opt/kernels) against the XLA update."""

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
from learned_opt.kernels import build, fused_lstm

pytestmark = pytest.mark.skipif(
  shutil.which("c++") is None and shutil.which("g++") is None,
  reason="no C++ compiler (c++ or g++) to build the fused kernel with",
)

# Measured largest differences to the XLA update over three steps (see the report in BUILD.md):
# ~2e-7 on updates and states; both sides use float32 transcendental approximations.
RTOL, ATOL = 1e-5, 2e-6

# Leaves: a scalar, one coordinate, 185 rows (not a multiple of the 4-row tile), and 1031 rows
# (three 512-row chunks, so both threads work, the last chunk partial).
SHAPES = {"scalar": (), "one": (1,), "matrix": (37, 5), "long": (1031,)}


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
  """Builds into a fresh cache directory, once for the module."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(build.CACHE_ENV_VAR, str(tmp_path_factory.mktemp("cache")))
    patch.delenv("CXX", raising=False)
    yield fused_lstm.target()


def _grads(key, scale_range=(-6.0, 1.0)):
  """Gradients of mixed magnitude (10^-6 .. 10), some exactly 0, shaped like SHAPES."""
  out = {}
  for name, shape in SHAPES.items():
    key, k1, k2, k3 = jax.random.split(key, 4)
    magnitude = 10.0 ** jax.random.uniform(k2, shape, minval=scale_range[0], maxval=scale_range[1])
    g = jax.random.normal(k1, shape) * magnitude
    out[name] = jnp.where(jax.random.uniform(k3, shape) < 0.05, 0.0, g)
  return out


def _phi(opt, seed=0):
  """Random phi with biases and read-out large enough that every gate and branch is exercised."""
  phi = opt.init_meta_params(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(phi)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten(
    [a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
  )


def _assert_trees_close(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
  "preprocess, hidden, layers",
  [("none", 20, 2), ("scale", 20, 1), ("log_sign", 20, 3), ("log_sign", 9, 2), ("none", 33, 1)],
)
def test_fused_update_equals_xla_update(kernel_cache, preprocess, hidden, layers):
  opt = learned_opt.lstm_optimizer(
    hidden_size=hidden, num_layers=layers, preprocess=preprocess, input_scale=3.0, output_scale=0.1
  )
  phi = _phi(opt)
  params = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}
  xla = jax.jit(opt.update)
  fused = jax.jit(lambda p, g, s: fused_lstm.fused_update(opt.config, kernel_cache, p, g, s))
  xla_state = fused_state = opt.init_state(phi, params)
  for step in range(3):  # the state threaded from step to step
    grads = _grads(jax.random.key(10 + step))
    xla_updates, xla_state = xla(phi, grads, xla_state)
    fused_updates, fused_state = fused(phi, grads, fused_state)
    _assert_trees_close((fused_updates, fused_state), (xla_updates, xla_state))
  assert float(jnp.max(jnp.abs(fused_state["long"].cell))) > 0.5  # the cells did move


def test_fused_update_thread_counts_and_spawned_threads_agree(kernel_cache):
  opt = learned_opt.lstm_optimizer()
  phi = _phi(opt, seed=3)
  params = {"w": jnp.zeros((2000,))}
  grads = {"w": jax.random.normal(jax.random.key(4), (2000,))}
  state = opt.init_state(phi, params)
  run = lambda **kw: fused_lstm.fused_update(opt.config, kernel_cache, phi, grads, state, **kw)
  one = jax.jit(lambda: run(threads=1))()
  for other in (jax.jit(lambda: run(threads=3))(), jax.jit(lambda: run(threads=2, spawn=True))()):
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # rows are independent


def test_nan_and_inf_gradients_behave_as_in_xla(kernel_cache):
  opt = learned_opt.lstm_optimizer(preprocess="log_sign")
  phi = _phi(opt)
  params = {"w": jnp.zeros((6,))}
  grads = {"w": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, 1e-30, -2.0])}
  state = opt.init_state(phi, params)
  expected = jax.jit(opt.update)(phi, grads, state)
  got = jax.jit(lambda: fused_lstm.fused_update(opt.config, kernel_cache, phi, grads, state))()
  assert np.isnan(got[0]["w"][0]) and np.all(np.isfinite(got[0]["w"][1:]))
  _assert_trees_close(got, expected)


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


def test_as_optax_fused_follows_the_xla_trajectory(kernel_cache):
  saved = learned_opt.pretrained("quadratic")
  xla_path, xla_loss, start = _quadratic_trajectory(learned_opt.as_optax(saved))
  fused_path, fused_loss, _ = _quadratic_trajectory(learned_opt.as_optax(saved, kernel="fused"))
  for fused, xla in zip(fused_path, xla_path, strict=True):
    _assert_trees_close(fused, xla)
  assert fused_loss == pytest.approx(xla_loss, rel=1e-4)
  assert fused_loss < start  # the optimizer does something on this problem


def test_the_in_place_state_update_leaves_an_undonated_state_intact(kernel_cache):
  # The kernel writes the new state over its input (input_output_aliases): with the state
  # donated XLA hands it the donated buffers; without, it must copy first, never clobber.
  opt = learned_opt.lstm_optimizer()
  phi = _phi(opt)
  tx = learned_opt.as_optax(opt, phi, kernel="fused")
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
  xla = learned_opt.as_optax(opt, phi)
  _assert_trees_close(kept, jax.jit(lambda s, g: xla.update(g, s))(state, grads))


def test_kernel_xla_never_builds(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("kernel='xla' must not build or load the fused kernel")

  monkeypatch.setattr(fused_lstm, "target", refuse)
  monkeypatch.setattr(build, "library", refuse)
  opt = learned_opt.lstm_optimizer()
  phi = opt.init_meta_params(jax.random.key(0))
  tx = learned_opt.as_optax(opt, phi)  # the default
  params = {"w": jnp.ones((3,))}
  updates, _ = jax.jit(tx.update)(params, tx.init(params))
  assert updates["w"].shape == (3,)


def test_without_a_compiler_auto_warns_once_and_equals_xla(monkeypatch):
  monkeypatch.setenv("CXX", "/nonexistent/c++")
  monkeypatch.setattr(build, "_WARNED", set())
  monkeypatch.setattr(jax, "device_count", lambda *args: 1)  # where auto uses the kernel
  monkeypatch.setenv("LEARNED_OPT_GATES", "xla")  # fused gates would raise without a compiler
  opt = learned_opt.lstm_optimizer()
  phi = _phi(opt)
  params = {"w": jnp.zeros((40,))}
  grads = {"w": jax.random.normal(jax.random.key(1), (40,))}
  fallback = learned_opt.as_optax(opt, phi, kernel="auto")
  with pytest.warns(RuntimeWarning, match=r"LSTM kernel is unavailable: .*\$CXX='/nonexistent/c"):
    got, _ = jax.jit(fallback.update)(grads, fallback.init(params))
  xla = learned_opt.as_optax(opt, phi, kernel="xla")
  expected, _ = jax.jit(xla.update)(grads, xla.init(params))
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(expected["w"]))  # XLA's own
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a second trace warns no more
    jax.jit(lambda g, s: fallback.update(g, s))(grads, fallback.init(params))


def test_fused_refuses_what_it_does_not_cover():
  gac = learned_opt.lstm_optimizer(global_cells=5)
  phi = gac.init_meta_params(jax.random.key(0))
  with pytest.raises(ValueError, match="global averaging cells.*kernel='auto'.*kernel='xla'"):
    learned_opt.as_optax(gac, phi, kernel="fused")
  ntm = learned_opt.ntm_bfgs_optimizer()
  with pytest.raises(ValueError, match="coordinatewise LSTM only"):
    learned_opt.as_optax(ntm, ntm.init_meta_params(jax.random.key(0)), kernel="fused")
  with pytest.raises(ValueError, match="kernel must be one of"):
    learned_opt.as_optax(gac, phi, kernel="fast")
  # auto runs GAC by XLA, exactly as the default does.
  params = {"w": jnp.arange(4.0)}
  auto, xla = learned_opt.as_optax(gac, phi, kernel="auto"), learned_opt.as_optax(gac, phi)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(auto.update)(params, auto.init(params))[0]["w"]),
    np.asarray(jax.jit(xla.update)(params, xla.init(params))[0]["w"]),
  )


def test_differentiating_the_fused_update_is_differentiating_xlas(kernel_cache):
  # The kernel has no derivative: under jax.grad the update is kernel='xla''s, values
  # and gradients alike, w.r.t. phi and the optimizee gradient.
  opt = learned_opt.lstm_optimizer(preprocess="log_sign")
  phi = _phi(opt)
  grads = _grads(jax.random.key(6))
  fused = learned_opt.as_optax(opt, phi, kernel="fused")
  state = fused.init(grads)

  def loss(kind, phi, g):
    updates, new_state = learned_opt.as_optax(opt, phi, kernel=kind).update(g, state)
    squares = sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))
    return squares + 0.1 * sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(new_state))

  for argnum in (0, 1):  # phi, the optimizee gradient
    expected = jax.jit(jax.grad(functools.partial(loss, "xla"), argnum))(phi, grads)
    actual = jax.jit(jax.grad(functools.partial(loss, "fused"), argnum))(phi, grads)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_fused_update_under_vmap_equals_xla(kernel_cache):
  opt = learned_opt.lstm_optimizer()
  phi = _phi(opt)
  params = {"w": jnp.zeros((3, 7))}
  grads = {"w": jax.random.normal(jax.random.key(2), (4, 3, 7))}  # 4 problems
  state = jax.vmap(lambda g: opt.init_state(phi, g))(grads)
  fused = jax.vmap(lambda g, s: fused_lstm.fused_update(opt.config, kernel_cache, phi, g, s))
  del params
  _assert_trees_close(
    jax.jit(fused)(grads, state), jax.jit(jax.vmap(opt.update, (None, 0, 0)))(phi, grads, state)
  )


def test_build_is_cached_atomic_and_survives_an_unwritable_cache(tmp_path, monkeypatch):
  compiled = []

  def fake_compile(cxx, source, output):
    compiled.append(output)
    assert source == fused_lstm.SOURCE
    assert output.endswith(".partial")  # written beside the final name, then renamed
    with open(output, "wb") as f:
      f.write(b"library")

  monkeypatch.setattr(build, "compile_library", fake_compile)
  monkeypatch.setattr(build, "library_name", lambda cxx, source: "lstm_step-test.so")
  cxx = build.compiler()
  path = build.library(fused_lstm.SOURCE, cxx, str(tmp_path / "cache"))
  assert path == str(tmp_path / "cache" / "lstm_step-test.so") and len(compiled) == 1
  again = build.library(fused_lstm.SOURCE, cxx, str(tmp_path / "cache"))
  assert again == path and len(compiled) == 1  # reused
  # No partial file left; the library's SHA-256 beside it.
  assert sorted(os.listdir(tmp_path / "cache")) == ["lstm_step-test.so", "lstm_step-test.so.sha256"]
  (tmp_path / "file").write_text("not a directory")
  elsewhere = build.library(fused_lstm.SOURCE, cxx, str(tmp_path / "file" / "cache"))
  assert os.path.isfile(elsewhere) and not elsewhere.startswith(str(tmp_path))
  shutil.rmtree(os.path.dirname(elsewhere))


def test_failed_build_leaves_nothing_and_says_why(tmp_path):
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(build.KernelUnavailable, match="compiling it with .* failed"):
    build.library(str(broken), build.compiler(), str(tmp_path / "cache"))
  assert os.listdir(tmp_path / "cache") == []


def test_a_library_without_the_handler_is_a_clear_error(kernel_cache):
  path = build.library(fused_lstm.SOURCE)  # the module's build, found in the cache
  with pytest.raises(build.KernelUnavailable, match="loading the built kernel .* failed"):
    build.register(path, "NoSuchHandler")


def test_library_name_depends_on_source_flags_and_cpu(tmp_path, monkeypatch):
  cxx = build.compiler()
  base = build.library_name(cxx, fused_lstm.SOURCE)
  assert base == build.library_name(cxx, fused_lstm.SOURCE) and base.startswith("lstm_step-")
  edited = tmp_path / "lstm_step.cc"
  edited.write_bytes(open(fused_lstm.SOURCE, "rb").read() + b"// edited\n")
  changed_source = build.library_name(cxx, str(edited))
  monkeypatch.setattr(build, "BUILD_FLAGS", build.BUILD_FLAGS + ("-g",))
  flagged = build.library_name(cxx, fused_lstm.SOURCE)
  monkeypatch.setattr(build, "cpu_features", lambda: "another cpu")
  names = {base, changed_source, flagged, build.library_name(cxx, fused_lstm.SOURCE)}
  assert len(names) == 4
