"""Many devices and many processes: ``jax.distributed`` start-up and the one global mesh.

JAX is the distributed engine: every process runs the same program on its own devices, and
arrays placed with a ``NamedSharding`` over the global mesh (``global_mesh``: all devices of all
processes, one axis ``problems``) are partitioned by XLA, which inserts the collectives a
computation needs (the mean over problems of a meta-step is an all-reduce XLA adds). This module
only starts the processes' runtime, builds the mesh, and moves trees between a host and the mesh:

* ``define_flags`` / ``initialize_from_flags``: ``--coordinator_address``, ``--num_processes``,
  ``--process_id`` and ``--distributed``; with no flags, ``jax.distributed.initialize`` is called
  where JAX detects a cluster by itself (Cloud TPU pod slices, SLURM, Open MPI, ...).
* ``mesh_from_flags``: the global mesh over ``--num_devices`` devices (default: all of them),
  an equal share of each process's own.
* ``put``: a host tree (the same on every process) as global arrays with a given sharding.
* ``to_host``: global arrays as numpy on every process (an all-gather when they are sharded over
  processes).
* ``gather_rows``: a small int32 row from every process on every process (whether to stop).
* ``broadcast_bytes``: process 0's bytes on every process (for what only process 0 reads, such
  as the checkpoint a run resumes from); ``read_on_writer``: a file as process 0 reads it.
"""

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "problems"
DISTRIBUTED_MODES = ("auto", "on", "off")
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


class MeshError(ValueError):
  """A setting that does not fit the mesh (e.g. a problem count that does not divide over it)."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the start-up flags of a multi-process run (once; entry points call it at import)."""
  if "coordinator_address" in flag_values:
    return
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordinator for a multi-process run (with --num_processes and "
    "--process_id). Unset: JAX's own detection on Cloud TPU, SLURM and Open MPI.",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "num_processes",
    None,
    "Processes of a multi-process run (one per host or per GPU).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "process_id",
    None,
    "This process's index in 0 .. --num_processes - 1.",
    flag_values=flag_values,
  )
  flags.DEFINE_enum(
    "distributed",
    "auto",
    DISTRIBUTED_MODES,
    "auto: start jax.distributed when the flags above are given or JAX detects a cluster with "
    "more than one process; on: always (JAX detects what the flags leave unset); off: one "
    "process.",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "num_devices",
    None,
    "Devices of the mesh: the first --num_devices / --num_processes of each process's own "
    "(a multiple of the process count). Default: every device of every process.",
    flag_values=flag_values,
  )


def detected_cluster() -> str | None:
  """The cluster JAX's ``jax.distributed.initialize()`` would detect, if it has >1 process.

  Reads JAX's cluster registry (``jax._src.clusters``, not public API); if that changes, this
  returns None and ``--distributed=on`` still leaves the detection to JAX.
  """
  try:
    from jax._src import clusters  # noqa: PLC0415 (private, looked up only when asked)

    kinds = clusters.ClusterEnv._cluster_types  # noqa: SLF001
    for kind in kinds:
      if not getattr(kind, "opt_in_only_method", False) and kind.is_env_present():
        return kind.__name__ if kind.get_process_count() > 1 else None
  except Exception:  # noqa: BLE001 (any failure of a private API means: nothing detected)
    return None
  return None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  mode: str = "auto",
) -> bool:
  """Starts ``jax.distributed`` when asked or detected; returns whether it did.

  Must run before any JAX computation (JAX's rule). With ``mode="auto"``, a run with none of
  the three settings and no detected multi-process cluster (``detected_cluster``) stays one
  plain process; with ``JAX_COORDINATOR_ADDRESS`` set, JAX reads that too.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"--distributed={mode!r} is unknown; choose one of {DISTRIBUTED_MODES}.")
  given = (coordinator_address, num_processes, process_id)
  if mode == "off":
    if any(v is not None for v in given):
      raise ValueError(
        "--distributed=off contradicts --coordinator_address/--num_processes/--process_id; "
        "drop one or the other."
      )
    return False
  if num_processes is not None and not num_processes > 0:
    raise ValueError(f"--num_processes must be positive, got {num_processes}.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(
      f"--process_id={process_id} must lie in 0 .. --num_processes - 1 = {num_processes - 1}."
    )
  wanted = (
    mode == "on"
    or any(v is not None for v in given)
    or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    or detected_cluster() is not None
  )
  if not wanted:
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """``initialize`` with the flags of ``define_flags``; ValueError names a bad flag."""
  return initialize(
    flag_values.coordinator_address,
    flag_values.num_processes,
    flag_values.process_id,
    flag_values.distributed,
  )


def is_writer() -> bool:
  """Whether this process writes files and logs: process 0 (the only one in a plain run)."""
  return jax.process_index() == 0


def select_devices(num_devices: int | None, devices=None) -> list:
  """The first ``num_devices / processes`` devices of each process (``None``: all of them).

  Args:
    num_devices: how many devices in all; a multiple of the process count with at most as many
      per process as the process with the fewest devices has.
    devices: every device of every process, in ``jax.devices()`` order (the default).

  Raises:
    ValueError: naming ``--num_devices`` and the values that fit.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    return devices
  valid = fitting_device_counts(devices)
  processes = valid[0]
  if num_devices not in valid:
    shown = ", ".join(map(str, valid[:8])) + (f", ..., {valid[-1]}" if len(valid) > 8 else "")
    raise ValueError(
      f"--num_devices={num_devices} does not fit the {len(devices)} visible devices of "
      f"{processes} process(es): it must be a positive multiple of the process count, taking "
      f"as many devices from each process. Use one of --num_devices={shown}."
    )
  share, taken = num_devices // processes, {}
  chosen = []
  for device in devices:
    taken[device.process_index] = taken.get(device.process_index, 0) + 1
    if taken[device.process_index] <= share:
      chosen.append(device)
  return chosen


def mesh_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Mesh:
  """``global_mesh`` over ``select_devices(--num_devices)``; call after ``initialize``."""
  return global_mesh(select_devices(flag_values.num_devices))


def global_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``problems`` over ``devices`` (default: every device of every process).

  ``jax.devices()`` lists each process's devices together, so process ``p`` holds the ``p``-th
  contiguous block of the problems.
  """
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Within the block, ``current_mesh()`` is ``mesh``: the command lines use it to give the
  trainer the global mesh without changing the library default (one device)."""
  token = _MESH.set(mesh)
  try:
    yield mesh
  finally:
    _MESH.reset(token)


def current_mesh() -> Mesh | None:
  """The mesh of the innermost ``use_mesh`` block; None outside any."""
  return _MESH.get()


def problems_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis (problems) split over the mesh; the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def check_divides(
  count: int,
  mesh: Mesh,
  flag: str,
  others: dict[str, int] | None = None,
  fits: Callable[[int, int], bool] | None = None,
) -> None:
  """Raises ``MeshError`` naming ``flag`` if ``count`` problems do not split evenly on ``mesh``.

  The message suggests counts that divide, and the ``--num_devices`` values under which
  ``count`` and the ``others`` counts (``{flag: count}``, e.g. the validation problems) all
  divide. ``fits(count, devices)``, if given (``memory.problems_fit``), drops the suggestions the
  memory check would refuse, so the two refusals never send a user back and forth.
  """
  size = mesh.devices.size
  if count % size == 0:
    return
  fits = fits or (lambda count, devices: True)
  lower, upper = count // size * size, -(-count // size) * size
  counts = [count, *(others or {}).values()]
  fewer = [
    k
    for k in reversed(fitting_device_counts())
    if k < size and all(c % k == 0 for c in counts) and fits(count, k)
  ]
  choices = [" or ".join(f"--{flag}={c}" for c in (upper, lower) if c and fits(c, size))]
  if fewer:  # none: several processes (no smaller multiple of their count divides every count)
    choices.append("run on fewer devices: " + " or ".join(f"--num_devices={k}" for k in fewer[:3]))
  advice = ", or ".join(c for c in choices if c)
  raise MeshError(
    f"--{flag}={count} does not divide over the {size} devices of the mesh "
    f"({jax.process_count()} process(es)); each device must hold as many problems. "
    + (f"Use {advice}." if advice else "No count that divides fits in memory: lower --unroll.")
  )


def fitting_device_counts(devices=None) -> list[int]:
  """The ``--num_devices`` values ``select_devices`` accepts, smallest first."""
  counts: dict[int, int] = {}
  for device in jax.devices() if devices is None else devices:
    counts[device.process_index] = counts.get(device.process_index, 0) + 1
  return [len(counts) * k for k in range(1, min(counts.values()) + 1)]


def _host_leaf(leaf):
  """A leaf as numpy; typed PRNG keys as their uint32 key data."""
  if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def put(tree, sharding):
  """``tree`` (the same values on every process) as global arrays placed by ``sharding``.

  Args:
    sharding: one ``Sharding`` for every leaf, or a tree of them shaped like ``tree``.

  Each process uploads only the shards its own devices hold. PRNG keys stay keys.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)

  def place(leaf, sharding):
    if jax.process_count() == 1:
      return jax.device_put(leaf, sharding)
    # Several processes: from host values, each process uploading its own devices' shards.
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(leaf)
      data = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
      wrap = lambda d: jax.random.wrap_key_data(d, impl=impl)
      return jax.jit(wrap, out_shardings=sharding)(data)
    return jax.device_put(np.asarray(leaf), sharding)

  return jax.tree.map(place, tree, sharding)


def to_host(tree):
  """Every leaf as numpy on every process (keys as their uint32 key data).

  Arrays whose shards all live in this process are read directly; others are first gathered
  by one jitted copy onto every device (an all-gather every process must call together).
  """
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.tree.map(_host_leaf, tree)
  mesh = next(x.sharding.mesh for x in leaves if not x.is_fully_addressable)
  return jax.tree.map(_host_leaf, _copy_to_every_device(mesh)(tree))


@functools.lru_cache
def _copy_to_every_device(mesh: Mesh):
  """One jitted copy of a tree onto every device of ``mesh`` (keys as their key data)."""
  return jax.jit(lambda t: jax.tree.map(_key_data, t), out_shardings=replicated(mesh))


def _key_data(leaf):
  if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(leaf)
  return leaf


def gather_rows(row: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Every process's ``row`` (int32), one per process in process order, on every process.

  Gathered by ``to_host`` (JAX's ``process_allgather`` between two meta-steps hung the next
  meta-step of a 2-process CPU (gloo) run, before the trainer ran them one at a time). All
  processes call it together; ``mesh`` must hold devices of every process.
  """
  row = np.asarray(row, np.int32)[None]
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  shape = (mesh.devices.size, row.shape[1])
  rows = jax.make_array_from_single_device_arrays(
    shape, problems_sharding(mesh), [jax.device_put(row, d) for d in local]
  )
  table = to_host(rows)
  owners = [d.process_index for d in mesh.devices.flat]
  return np.stack([table[owners.index(p)] for p in range(jax.process_count())])


def read_on_writer(path: str) -> bytes | None:
  """The file at ``path`` as process 0 sees it (None if it has none), on every process.

  For what a command reads back from its own output (a cache, earlier results): only process 0
  writes those, so the other processes take its copy and every process decides alike. All
  processes call it together.
  """
  data = None
  if is_writer() and os.path.isfile(path):
    with open(path, "rb") as f:
      data = f.read()
  if jax.process_count() == 1:
    return data
  sent = broadcast_bytes(b"0" if data is None else b"1" + data)  # 1: present, 0: missing
  return sent[1:] if sent[:1] == b"1" else None


def broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's ``data`` on every process (others pass None); all processes call it together."""
  if jax.process_count() == 1:
    return data or b""
  length = np.asarray(len(data) if is_writer() else 0, np.int32)
  length = int(multihost_utils.broadcast_one_to_all(length))
  buffer = np.zeros(length, np.uint8)
  if is_writer():
    buffer = np.frombuffer(data, np.uint8).copy()
  return multihost_utils.broadcast_one_to_all(buffer).tobytes()
