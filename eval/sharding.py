"""Spreading a batch of problems over every device: a 1-D mesh along the problems axis.

Sweeps vectorize first (vmap over problems, seeds, learning rates) and shard second: placing the
inputs with a ``NamedSharding`` lets ``jax.jit`` partition the one computation across devices,
with no change to the math. The mesh is ``train.distributed``'s global one (every device of every
process). A problem count that does not divide over the mesh is padded with copies of the last
problem (``pad_problems``), whose results are dropped: problems never interact in a sweep, so the
kept results are those of the unpadded run.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import distributed

AXIS = distributed.AXIS


def problems_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all of every process) whose axis is ``problems``."""
  return distributed.global_mesh(devices)


def padded_count(count: int, mesh: Mesh) -> int:
  """``count`` rounded up to a multiple of the mesh's devices."""
  size = mesh.devices.size
  return -(-count // size) * size


def pad_problems(tree, mesh: Mesh):
  """``(tree on the mesh, problems)``: leaves' leading axis (problems) padded and split.

  ``tree`` holds the same values on every process (host arrays or arrays of this process); the
  padding repeats the last problem up to ``padded_count``. Slice results back to ``problems``.
  """
  count = int(np.shape(jax.tree.leaves(tree)[0])[0])
  extra = padded_count(count, mesh) - count
  if extra:
    tree = jax.tree.map(
      lambda x: jax.numpy.concatenate([x, jax.numpy.repeat(x[-1:], extra, 0)]), tree
    )
  return distributed.put(tree, distributed.problems_sharding(mesh)), count


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
