r"""The conv layers' CPU kernels against XLA, layer by layer (run by hand, not a test).

  python -m benchmarks.conv_layers [--repeats=10]

For each layer shape of the CIFAR-10 net (128 images, 2 problems' worth) and of neural art's VGG16
up to conv2_1 (8 images), the median wall time of one jitted call, outside any scan, and its
GFLOP/s (2 x outputs x kh x kw x in_channels): the direct convolution kernel's forward
(``learned_opt.kernels.conv``) against im2col by shifted slices and one matmul
(``tasks.cifar10.conv_shift``); the kernel gradient alone; the whole VJP of both. Then the
CIFAR-10 net's batch-norm-pooling-ReLU tail, VJP included, by its kernels
(``learned_opt.kernels.bn_pool``) and by XLA (``tasks.cifar10.conv_tail``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import peak
from learned_opt.kernels import bn_pool, conv
from tasks import cifar10

flags.DEFINE_integer("repeats", 10, "Timed calls per measurement, after one compiled call.")
FLAGS = flags.FLAGS

# (name, input shape, kernel shape): the CIFAR-10 net's three layers at 2 x 128 images, VGG16's
# first three at 2 x 4 images of 64 x 64, and VGG's conv1_2 image gradient (64 -> 3 outputs).
LAYERS = (
  ("cifar conv_0", (256, 32, 32, 3), (3, 3, 3, 16)),
  ("cifar conv_1", (256, 16, 16, 16), (3, 3, 16, 16)),
  ("cifar conv_2", (256, 8, 8, 16), (3, 3, 16, 16)),
  ("vgg conv1_1", (8, 64, 64, 3), (3, 3, 3, 64)),
  ("vgg conv1_2", (8, 64, 64, 64), (3, 3, 64, 64)),
  ("vgg conv2_1", (8, 32, 32, 64), (3, 3, 64, 128)),
  ("vgg image grad", (8, 64, 64, 64), (3, 3, 64, 3)),
)


def median_ms(fn, *args) -> float:
  return 1e3 * peak.median_seconds(fn, *args, repeats=FLAGS.repeats)


def vjp_of(fn):
  return jax.jit(lambda x, k, dy: jax.vjp(fn, x, k)[1](dy))


def main(argv):
  del argv
  names, tail_names = conv.targets(), bn_pool.targets()
  kernel_conv = lambda x, k: conv.conv2d(names, x, k)
  key = jax.random.key(0)
  print(f"jax {jax.__version__}, {jax.devices()}")
  columns = ("kernel fwd", "shift fwd", "kernel dk", "VJP kernel/shift")
  print(f"{'layer':<15}" + "".join(f"{c:>22}" for c in columns))
  for name, shape, kernel_shape in LAYERS:
    keys = jax.random.split(key, 3)
    x, k = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], kernel_shape)
    dy = jax.random.normal(keys[2], shape[:-1] + kernel_shape[-1:])
    gflop = 2 * np.prod(shape[:-1]) * np.prod(kernel_shape) / 1e9
    fwd = median_ms(jax.jit(kernel_conv), x, k)
    shift = median_ms(jax.jit(cifar10.conv_shift), x, k)
    dk_call = jax.ffi.ffi_call(names[1], jax.ShapeDtypeStruct(kernel_shape, jnp.float32))
    dk = median_ms(jax.jit(dk_call), x, dy)
    vjp_k = median_ms(vjp_of(kernel_conv), x, k, dy)
    vjp_s = median_ms(vjp_of(cifar10.conv_shift), x, k, dy)
    print(
      f"{name:<15}{fwd:>9.2f} ms {gflop / fwd * 1e3:>5.0f} GF/s{shift:>9.2f} ms "
      f"{gflop / shift * 1e3:>5.0f} GF/s{dk:>9.2f} ms {gflop / dk * 1e3:>5.0f} GF/s"
      f"{vjp_k:>11.2f} / {vjp_s:.2f} ms"
    )
  for shape in ((256, 32, 32, 16), (256, 16, 16, 16)):
    z = 3.0 + jax.random.normal(key, shape)
    bias = jnp.zeros(shape[-1:])
    dy = jax.random.normal(key, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    tail = lambda z, b: bn_pool.bn_pool_relu(tail_names, z, b, cifar10.BATCH_NORM_EPSILON)
    kernel_ms = median_ms(vjp_of(tail), z, bias, dy)
    xla_ms = median_ms(vjp_of(cifar10.conv_tail), z, bias, dy)
    print(f"tail {shape}: VJP (forward + backward) kernels {kernel_ms:.2f} ms, XLA {xla_ms:.2f} ms")


if __name__ == "__main__":
  app.run(main)
