"""How much memory a process's control groups (a container's limit) still let it use.

On the host, the memory check compares a meta-step's estimate with what is available; in a
container the kernel kills a process at the container's limit however much the machine has free,
so that limit counts too (cgroup v2 and v1).
"""

import os

ROOT = "/sys/fs/cgroup"
# cgroup v1 writes "no limit" as the largest page-aligned int64; anything this large is none.
_UNLIMITED = 2**60


def available(root: str = ROOT, membership: str = "/proc/self/cgroup") -> int | None:
  """Bytes this process's cgroups let it still use: the least of limit - usage over its memory
  cgroup and their ancestors (a parent's limit binds its children); None if no limit is known.

  cgroup v2 (``memory.max``, ``memory.current``, ``memory.stat``) and v1 (under ``memory/``:
  ``memory.limit_in_bytes``, ``memory.usage_in_bytes``). Usage counts the page cache, which the
  kernel reclaims before it kills anything, so its inactive part (``inactive_file``) is not
  counted as used, as container runtimes count a working set. Unreadable files (none, no
  permission, "max": unlimited) leave that level unlimited.

  Args:
    root: where the cgroup file systems are mounted (tests point it at a fake tree).
    membership: the process's cgroups, in ``/proc/self/cgroup``'s format.
  """
  paths = _cgroup_paths(membership)
  levels = [
    (root, paths.get("v2", "/"), "memory.max", "memory.current", "inactive_file"),
    (os.path.join(root, "memory"), paths.get("v1", "/"), *_V1_FILES),
  ]
  known = [
    room
    for mount, path, *files in levels
    for directory in _ancestors(mount, path)
    if (room := _cgroup_room(directory, *files)) is not None
  ]
  return max(0, min(known)) if known else None


_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_paths(membership: str) -> dict[str, str]:
  """``{"v2": path, "v1": path}``: the process's memory cgroups, as ``membership`` names them."""
  try:
    with open(membership) as f:
      lines = f.read().splitlines()
  except OSError:
    return {}
  paths = {}
  for line in lines:
    hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
    if hierarchy == "0" and not controllers:
      paths["v2"] = path
    elif "memory" in controllers.split(","):
      paths["v1"] = path
  return paths


def _ancestors(mount: str, path: str) -> list[str]:
  """The directories of cgroup ``path`` and of its ancestors under ``mount``, innermost first.

  Without a cgroup namespace, a container sees its own cgroup mounted at ``mount`` while
  ``/proc/self/cgroup`` names the host's path: then only ``mount`` itself is read.
  """
  parts = [p for p in path.split("/") if p]
  if not os.path.isdir(os.path.join(mount, *parts)):
    parts = []
  return [os.path.join(mount, *parts[:i]) for i in range(len(parts), -1, -1)]


def _cgroup_room(directory: str, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
  """``limit - (usage - inactive page cache)`` of one cgroup; None if it has no readable limit."""
  try:
    with open(os.path.join(directory, limit_file)) as f:
      limit = f.read().strip()
    if limit == "max" or int(limit) >= _UNLIMITED:
      return None
    with open(os.path.join(directory, usage_file)) as f:
      usage = int(f.read().strip())
  except (OSError, ValueError):
    return None
  return int(limit) - usage + _stat(directory, inactive_key)


def _stat(directory: str, key: str) -> int:
  """One counter of the cgroup's ``memory.stat`` (v1's ``total_`` one, else the plain one); 0 if
  unreadable."""
  try:
    with open(os.path.join(directory, "memory.stat")) as f:
      fields = dict(line.split(None, 1) for line in f if line.strip())
  except (OSError, ValueError):
    return 0
  value = fields.get(key, fields.get(key.removeprefix("total_"), "0"))
  try:
    return int(value)
  except ValueError:
    return 0
