"""Spreading a batch of problems over every device: a 1-D mesh along the problems axis.

Sweeps vectorize first (vmap over problems, seeds, learning rates) and shard second: placing the
inputs with a ``NamedSharding`` lets ``jax.jit`` partition the one computation across devices,
with no change to the math.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "problems"


def problems_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all of them) whose axis is named ``problems``."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


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
