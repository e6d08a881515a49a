"""The CPU kernels built with given flags, checked against XLA (run by ``.ci/kernels``).

  python .ci/kernel_checks.py --flags=native|isa|sanitize --cache=DIR [--save=OUT.npz|--build_only]
  python .ci/kernel_checks.py --compare A.npz B.npz [--exact]

A run builds ``learned_opt/kernels``' sources with the named flag set into ``--cache`` (never the
user's cache), registers them under their own target names, and runs the gates, the stacked
step and the stacked step with its read-out, forward and backward (VJP), on inputs with odd row
counts, several 128-row chunks and odd widths, against XLA's math (``learned_opt.lstm_rows``),
the direct convolution, forward and VJP, on odd image sizes, partial vectors of output channels
and several chunks of images, against ``lax.conv_general_dilated``, and the CIFAR-10 net's batch
norm, pooling and ReLU against ``tasks.cifar10.conv_tail``, neural art's Gram matrix (channel
counts in whole and partial vectors, grouped) against ``F^T F / n``, and the per-parameter MLP's
network (forward, VJP, per-problem VJPs under vmap) against ``per_param_mlp.mlp_outputs``, and
the stacked steps' per-problem VJPs under vmap for 103 problems of 10 rows; with
``--save`` it writes every kernel output for ``--compare``. Exit status 1 on a mismatch.
"""

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt import lstm_rows, per_param_mlp
from learned_opt.kernels import bn_pool, build, conv, gram, loading, mlp, stack
from tasks import cifar10

# Every kernel source with its handlers: the LSTM's (``stack.targets()``' order), then the
# convolution's (``conv.HANDLERS``), the conv layers' tail (``bn_pool.HANDLERS``), the Gram
# matrix's (``gram.HANDLERS``) and the per-coordinate MLP's (``mlp.HANDLERS``).
SOURCES = (
  *stack.SOURCES,
  (conv.SOURCE, conv.HANDLERS),
  (bn_pool.SOURCE, bn_pool.HANDLERS),
  (gram.SOURCE, gram.HANDLERS),
  (mlp.SOURCE, mlp.HANDLERS),
)
STACK_TARGETS = sum(len(handlers) for _, handlers in stack.SOURCES)  # the first targets
# Then the convolution's, the tail's and the Gram's; the MLP's last.
CONV_TARGETS = len(conv.HANDLERS) + len(bn_pool.HANDLERS) + len(gram.HANDLERS)

# Measured differences to XLA are ~1e-6 relative (a polynomial exp); cotangents summed over
# many rows are compared relative to their largest entry.
RTOL, ATOL = 1e-5, 5e-6


def flag_sets() -> dict[str, tuple[str, ...]]:
  """The builds CI checks: the shipped flags, a fixed instruction set, and the sanitizers."""
  base = tuple(f for f in build.BUILD_FLAGS if f not in ("-O3", "-march=native"))
  fixed = "-march=x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "-march=armv8-a"
  return {
    "native": build.BUILD_FLAGS,
    "isa": ("-O3", fixed, *base),
    "sanitize": (
      "-O1",
      "-g",
      "-fno-omit-frame-pointer",
      "-fsanitize=address,undefined",
      "-fno-sanitize-recover=undefined",
      "-march=native",
      *base,
    ),
  }


def targets(flags: tuple[str, ...], cache: str) -> tuple[str, ...]:
  """The kernels built with ``flags`` in ``cache`` and registered: ``SOURCES``' order."""
  names = []
  for source, handlers in SOURCES:
    path, content = build.built(source, directory=cache, flags=flags)
    names += [loading.register(path, handler, content) for handler in handlers]
  return tuple(names)


def _inputs(key, rows, features, hidden, layers):
  k = jax.random.split(key, 6 + 2 * layers)
  x = 2.0 * jax.random.normal(k[0], (rows, features))
  h = jax.random.normal(k[1], (rows, layers, hidden))
  c = 2.0 * jax.random.normal(k[2], (rows, layers, hidden))
  weights = []
  for i in range(layers):
    fan_in = (features if i == 0 else hidden) + hidden
    weights.append(jax.random.normal(k[6 + 2 * i], (fan_in, 4 * hidden)) / np.sqrt(fan_in))
    weights.append(jax.random.normal(k[7 + 2 * i], (4 * hidden,)))
  out = [jax.random.normal(k[3], (hidden, 1)) / np.sqrt(hidden), jax.random.normal(k[4], (1,))]
  return x, h, c, weights, out, k[5]


def _xla_stack(x, h, c, *weights, readout=False):
  """XLA's stacked step (``lstm_rows.stacked_rows``): ``(h', c'[, u])``."""
  n = len(weights) - (2 if readout else 0)
  layers = [{"w": w, "b": b} for w, b in zip(weights[:n:2], weights[1:n:2], strict=True)]
  top, hidden, cell = lstm_rows.stacked_rows(layers, x, h, c, 0)
  if not readout:
    return hidden, cell
  return hidden, cell, (top @ weights[n] + weights[n + 1])[:, 0]


def _vjp(fn, primals, key):
  """``(outputs, cotangents of the primals)`` for random output cotangents drawn from ``key``."""
  outputs, pullback = jax.vjp(fn, *primals)
  keys = jax.random.split(key, len(outputs))
  cotangents = tuple(jax.random.normal(k, o.shape) for k, o in zip(keys, outputs, strict=True))
  return [np.asarray(a) for a in (*outputs, *pullback(cotangents))]


def _per_problem_vjp_of_stack(fn, primals, key):
  """Each problem's outputs and VJP of ``fn(x, h, c, *weights)``, x, h and c with a leading
  problems axis and the weights shared: a vmapped VJP, so each problem has its own weight
  cotangents; jitted."""
  x, h, c, *weights = primals

  def one(x, h, c, *cotangents):
    outputs, pullback = jax.vjp(fn, x, h, c, *weights)
    return (*outputs, *pullback(cotangents))

  shapes = jax.eval_shape(jax.vmap(lambda x, h, c: fn(x, h, c, *weights)), x, h, c)
  keys = jax.random.split(key, len(shapes))
  cotangents = [jax.random.normal(k, o.shape) for k, o in zip(keys, shapes, strict=True)]
  return [np.asarray(a) for a in jax.jit(jax.vmap(one))(x, h, c, *cotangents)]


def _sequence(names, x, h, c, weights, key, steps=3):
  """A truncation of ``steps`` read-out steps in a workspace and its sequence backward kernel,
  against XLA's steps and their autodiff: (kernel outputs, XLA's): each step's u, the final h
  and c, and the weights' cotangents of sum_t du_t . u_t."""
  k = jax.random.split(key, 2)
  xs = jnp.stack([x * (1.0 + 0.5 * t) for t in range(steps)])
  dus = jax.random.normal(k[1], (steps,) + x.shape[:1])

  def xla(weights):
    def body(carry, inputs):
      h, c, u = _xla_stack(inputs[0], *carry, *weights, readout=True)
      return (h, c), (u, jnp.sum(u * inputs[1]))

    (h_t, c_t), (us, terms) = jax.lax.scan(body, (h, c), (xs, dus))
    return jnp.sum(terms), (us, h_t, c_t)

  @jax.jit
  def kernels(weights):
    wh = jnp.zeros((steps + 1,) + h.shape).at[0].set(h)
    wc = jnp.zeros((steps + 1,) + c.shape).at[0].set(c)

    def body(carry, x_t):
      wh, wc, u = stack.readout_step_in_workspace(names, x_t, *carry[:2], carry[2], *weights)
      return (wh, wc, carry[2] + 1), u

    (wh, wc, _), us = jax.lax.scan(body, (wh, wc, jnp.zeros((), jnp.int32)), xs)
    return us, wh[-1], wc[-1], *stack.readout_sequence_backward(names, xs, wh, wc, *weights, dus)

  grads, (us, h_t, c_t) = jax.grad(xla, has_aux=True)(weights)
  return [np.asarray(a) for a in kernels(weights)], [np.asarray(a) for a in (us, h_t, c_t, *grads)]


def _one_output(fn, shape):
  """``fn(a, b)`` jitted, vmapped over a leading problems axis for 5-d ``shape``, its output in a
  tuple (as ``_vjp`` takes them)."""
  mapped = jax.vmap(fn) if len(shape) == 5 else fn
  return jax.jit(lambda a, b: (mapped(a, b),))


def _record(results: dict, name: str, got, want, relative: float = 1e-6) -> None:
  """Asserts each output in ``got`` is within tolerance of ``want`` (relative to its largest
  entry) and records it in ``results`` as ``name_i``."""
  for i, (a, b) in enumerate(zip(got, want, strict=True)):
    scale = float(np.max(np.abs(b), initial=0.0))
    atol = max(ATOL, relative * scale)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=f"{name} {i}")
    results[f"{name}_{i}"] = a


def run_conv(names) -> dict[str, np.ndarray]:
  """The convolution, the tail and the Gram matrix (``names``: their targets) against XLA's;
  outputs by name."""
  conv_names = names[: len(conv.HANDLERS)]
  tail_names = names[len(conv.HANDLERS) : len(conv.HANDLERS) + len(bn_pool.HANDLERS)]
  gram_names = names[-len(gram.HANDLERS) :]
  results = {}
  # (images, height, width, in), (kh, kw, in, out): the CIFAR-10 net's layers; 17 images (three
  # chunks of the kernel's gradient, the last partial) of odd sizes with 19 outputs (a vector and
  # a partial one) and a 5 x 3 kernel; a grouped call (vmap) of 2 problems; VGG's 64 channels
  # in, to 3 out (neural art's image gradient).
  cases = [((9, 32, 32, 3), (3, 3, 3, 16)), ((9, 16, 16, 16), (3, 3, 16, 16))]
  cases += [((3, 6, 10, 64), (3, 3, 64, 3))]
  cases += [((17, 7, 13, 5), (5, 3, 5, 19)), ((2, 3, 4, 4, 6), (2, 3, 3, 6, 8))]
  for shape, kernel_shape in cases:
    keys = jax.random.split(jax.random.key(len(results)), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], kernel_shape) / np.sqrt(np.prod(kernel_shape[-4:-1]))
    got = _vjp(_one_output(lambda a, b: conv.conv2d(conv_names, a, b), shape), (x, kernel), keys[2])
    want = _vjp(_one_output(cifar10.conv_xla, shape), (x, kernel), keys[2])
    _record(results, f"conv_{'x'.join(map(str, shape))}", got, want)
  # Batch norm, pooling and ReLU: 17 images, 16 and 19 channels, an offset input with ties.
  for shape in ((17, 8, 6, 16), (9, 4, 10, 19), (2, 5, 4, 4, 16)):
    keys = jax.random.split(jax.random.key(len(results)), 3)
    z = 3.0 + 2.0 * jax.random.normal(keys[0], shape)
    z = z.at[..., 0, :2, :2, :].set(1.5)
    bias = jax.random.normal(keys[1], shape[:-4] + shape[-1:])
    tail = lambda a, b: bn_pool.bn_pool_relu(tail_names, a, b, cifar10.BATCH_NORM_EPSILON)
    got = _vjp(_one_output(tail, shape), (z, bias), keys[2])
    want = _vjp(_one_output(cifar10.conv_tail, shape), (z, bias), keys[2])
    _record(results, f"tail_{'x'.join(map(str, shape))}", got, want)
  # The Gram matrix: VGG16's 64 channels, 20 and 33 (a padded copy), two leading dims.
  for shape in ((3, 300, 64), (2, 45, 20), (2, 3, 17, 33)):
    features = jax.random.normal(jax.random.key(len(results)), shape)
    got = jax.jit(lambda f: gram.gram(gram_names, f))(features)
    want = np.swapaxes(features, -1, -2) @ features / shape[-2]
    _record(results, f"gram_{'x'.join(map(str, shape))}", [got], [want])
  return results


def _xla_mlp(x, *weights):
  """XLA's per-coordinate MLP (``per_param_mlp.mlp_outputs``) on ``w_0, b_0, ..., w_out, b_out``."""
  pairs = [{"w": w, "b": b} for w, b in zip(weights[0::2], weights[1::2], strict=True)]
  return per_param_mlp.mlp_outputs({"layers": pairs[:-1], "out": pairs[-1]}, x)


def _per_problem_vjp(fn, x, weights, dy):
  """Each problem's (row of ``x``'s) cotangents of x and the shared weights: a vmapped VJP."""
  return jax.vmap(lambda x, dy: jax.vjp(fn, x, *weights)[1](dy))(x, dy)


def run_mlp(names) -> dict[str, np.ndarray]:
  """The per-coordinate MLP (``names``: its targets), forward and VJP, against XLA's: the
  optimizer's 11 -> 32 -> 32 -> 2 on three 512-row chunks (the last partial), narrow and
  partial-vector layers, no hidden layer, and per-problem VJPs under vmap (shared weights, each
  problem's own weight cotangents); outputs by name."""
  results = {}
  kernel = lambda *a: mlp.mlp(names, *a)
  for shape, sizes in [((1031,), (11, 32, 32)), ((3, 37), (5, 20)), ((9,), (3,)), ((50,), (3, 7))]:
    key = jax.random.key(len(results))
    phi = per_param_mlp.init_mlp_params(key, sizes, 1e-3)
    out_w = 0.3 * jax.random.normal(jax.random.fold_in(key, 1), phi["out"]["w"].shape)
    weights = [a for layer in phi["layers"] for a in (layer["w"], layer["b"])]
    weights += [out_w, phi["out"]["b"]]
    x = 2.0 * jax.random.normal(jax.random.fold_in(key, 2), shape + sizes[:1])
    name = f"mlp_{'x'.join(map(str, shape))}"
    got = _vjp(jax.jit(lambda *a: (kernel(*a),)), (x, *weights), key)
    _record(results, name, got, _vjp(lambda *a: (_xla_mlp(*a),), (x, *weights), key))
    if len(shape) == 2:
      dy = jax.random.normal(key, shape + (2,))
      got = jax.jit(_per_problem_vjp, static_argnums=0)(kernel, x, weights, dy)
      _record(results, f"{name}_vmap", got, _per_problem_vjp(_xla_mlp, x, weights, dy))
  return results


def run(names) -> dict[str, np.ndarray]:
  """Every kernel against XLA; the kernels' outputs by name. Raises AssertionError."""
  results = run_conv(names[STACK_TARGETS : STACK_TARGETS + CONV_TARGETS])
  results.update(run_mlp(names[STACK_TARGETS + CONV_TARGETS :]))
  cases = [(1, 1, 20, 2), (1031, 2, 20, 2), (37, 1, 7, 3), (300, 3, 33, 1)]
  for rows, features, hidden, layers in cases:
    x, h, c, weights, out, key = _inputs(jax.random.key(rows), rows, features, hidden, layers)
    for readout in (False, True):
      extra = out if readout else []
      kernel = stack.stack_readout if readout else stack.stack
      primals = (x, h, c, *weights, *extra)
      got = _vjp(jax.jit(lambda *a, k=kernel: k(names, *a)), primals, key)
      want = _vjp(lambda *a, r=readout: _xla_stack(*a, readout=r), primals, key)
      for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = float(np.max(np.abs(b), initial=0.0))
        np.testing.assert_allclose(
          a, b, rtol=RTOL, atol=max(ATOL, 1e-5 * scale), err_msg=f"stack {rows} {readout} {i}"
        )
        results[f"stack_{rows}_{int(readout)}_{i}"] = a
      if rows == 1031:  # 103 problems of 10 rows: several to a chunk, tiles spanning them
        problems = [a[:1030].reshape((103, 10) + a.shape[1:]) for a in (x, h, c)]
        primals = (*problems, *weights, *extra)
        got = _per_problem_vjp_of_stack(lambda *a, k=kernel: k(names, *a), primals, key)
        want = _per_problem_vjp_of_stack(
          lambda *a, r=readout: _xla_stack(*a, readout=r), primals, key
        )
        _record(results, f"stack_vmap_{int(readout)}", got, want)
    got, want = _sequence(names, x, h, c, [*weights, *out], key)
    _record(results, f"sequence_{rows}", got, want, relative=1e-5)
    z = 3.0 * jax.random.normal(key, (rows, 4 * hidden))
    got = _vjp(jax.jit(lambda z, c: stack.gates(names, z, c)), (z, c[:, 0]), key)
    want = _vjp(lstm_rows.xla_gates, (z, c[:, 0]), key)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
      np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"gates {rows} {i}")
      results[f"gates_{rows}_{i}"] = a
  return results


def compare(first: str, second: str, exact: bool) -> None:
  a, b = np.load(first), np.load(second)
  assert sorted(a.files) == sorted(b.files)
  worst = 0.0
  for name in a.files:
    if exact:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    else:
      scale = float(np.max(np.abs(b[name]), initial=0.0))
      np.testing.assert_allclose(
        a[name], b[name], rtol=RTOL, atol=max(ATOL, 1e-5 * scale), err_msg=name
      )
      worst = max(worst, float(np.max(np.abs(a[name] - b[name]), initial=0.0)))
  how = "bit for bit" if exact else f"within rtol {RTOL} (largest difference {worst:.2e})"
  print(f"{first} and {second}: {len(a.files)} outputs agree {how}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--flags", choices=sorted(flag_sets()))
  parser.add_argument("--cache")
  parser.add_argument("--save")
  parser.add_argument("--build_only", action="store_true", help="build into --cache, load nothing")
  parser.add_argument("--compare", nargs=2)
  parser.add_argument("--exact", action="store_true")
  args = parser.parse_args()
  if args.compare:
    compare(*args.compare, args.exact)
    return 0
  if args.build_only:  # no process that loads a sanitized build need compile it
    for source, _ in SOURCES:
      build.built(source, directory=args.cache, flags=flag_sets()[args.flags])
    return 0
  names = targets(flag_sets()[args.flags], args.cache)
  results = run(names)
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(
    f"{args.flags}: {len(results)} kernel outputs agree with XLA ({threads} CPU(s) for XLA's "
    f"thread pool, jax {jax.__version__})"
  )
  if args.save:
    np.savez(args.save, **results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
