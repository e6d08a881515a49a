"""Spreading a batch of problems over every device: a 1-D mesh along the problems axis.

Sweeps vectorize first (vmap over problems, seeds, learning rates) and shard second: placing the
inputs with a ``NamedSharding`` lets ``jax.jit`` partition the one computation across devices,
with no change to the math. The mesh is ``train.distributed``'s global one (every device of every
process, or the command line's ``--num_devices``), or in one process as few of its devices as
keep the problems per device (``fit_mesh``).
A problem count that does not divide over the devices is padded with copies of the last problem
(``place_problems``), whose results are dropped: problems never interact in a sweep, so the kept
results are those of the unpadded run.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import distributed

AXIS = distributed.AXIS


def problems_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` whose axis is ``problems``.

  Default: the mesh of an enclosing ``distributed.use_mesh`` block (a command line's, e.g. of
  ``--num_devices`` devices), else every device of every process.
  """
  if devices is None and distributed.current_mesh() is not None:
    return distributed.current_mesh()
  return distributed.global_mesh(devices)


def fit_mesh(count: int, mesh: Mesh) -> Mesh:
  """The devices of ``mesh`` a sweep of ``count`` problems runs on.

  One process: the fewest devices that hold as many problems each as all of them would, so
  padding stays below one problem per device (on 8 devices, 3 problems take 3 devices and 13
  take 7 with 2 each). Several processes: every device, since each process must take part.
  """
  size = mesh.devices.size
  per_device = -(-count // size)
  devices = -(-count // per_device)
  if jax.process_count() > 1 or devices == size:
    return mesh
  return problems_mesh(list(mesh.devices.flat)[:devices])


def padded_count(count: int, mesh: Mesh) -> int:
  """``count`` rounded up to a multiple of the mesh's devices."""
  size = mesh.devices.size
  return -(-count // size) * size


def place_problems(tree, mesh: Mesh):
  """``(tree on the mesh, problems, mesh)``: leaves' leading axis (problems) padded and split.

  ``tree`` holds the same values on every process (host arrays or arrays of this process). The
  mesh is ``fit_mesh``'s; the padding repeats the last problem up to ``padded_count``. Slice
  results back to ``problems``.
  """
  count = int(np.shape(jax.tree.leaves(tree)[0])[0])
  mesh = fit_mesh(count, mesh)
  extra = padded_count(count, mesh) - count
  if extra:
    pad = lambda x: jax.numpy.concatenate([x, jax.numpy.repeat(x[-1:], extra, axis=0)])
    tree = jax.tree.map(pad, tree)
  return distributed.put(tree, distributed.problems_sharding(mesh)), count, mesh


def shard_problems(tree, mesh: Mesh | None = None):
  """Places every leaf, leading axis = problems, split across the mesh.

  Leaves stay where they are when there is one device or the problem count does not divide
  evenly over the devices (then the computation simply runs unsharded).
  """
  mesh = mesh or problems_mesh()
  size = mesh.devices.size
  leaves = jax.tree.leaves(tree)
  if size == 1 or not leaves or any(np.shape(x)[0] % size for x in leaves):
    return tree
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  return jax.device_put(tree, sharding)
