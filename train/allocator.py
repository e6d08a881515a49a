"""tcmalloc for the command-line jobs, on request: faster meta-steps on CPU, more memory.

XLA:CPU allocates a meta-step's large buffers (the unroll's saved values, hundreds of MB) afresh
on every call. glibc's malloc maps buffers that large from the kernel and unmaps them when they
are freed, so every meta-step page-faults its way through them again: 10-13% of the MNIST
meta-step's CPU time is the kernel's. tcmalloc keeps freed pages for reuse: the MNIST meta-step
is 13-15% faster, but the process can hold more memory than the meta-step's estimate
(``train.memory``) allows for, 1.4-1.6x the resident memory at 8 MNIST problems (BUILD.md), so
it is not the default. A running process cannot change its allocator, so ``train.meta_train``
executes itself once more, at start, with the library in ``LD_PRELOAD`` (``benchmarks.perf``
starts its workloads so).

``LEARNED_OPT_MALLOC`` chooses: unset or ``system``, the system's; ``tcmalloc``, tcmalloc
(Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``); a path, that library.
"""

import os
import sys
from collections.abc import Mapping

ENV = "LEARNED_OPT_MALLOC"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def _preloaded(value: str) -> list[str]:
  """The libraries an ``LD_PRELOAD`` value names (spaces or colons between them)."""
  return value.replace(":", " ").split()


def find_tcmalloc(dirs=_DIRS) -> str | None:
  """The path of an installed tcmalloc, or None."""
  for directory in dirs:
    for name in _NAMES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def preload_env(environ: Mapping[str, str], find=find_tcmalloc) -> dict[str, str] | None:
  """The environment to run again with, or None where the process should go on as it is.

  None: ``LEARNED_OPT_MALLOC`` unset or ``system``, not Linux, or the library already in
  ``LD_PRELOAD`` (so the second run never runs a third). ValueError: tcmalloc asked for and not
  installed, or a path that is not a file.
  """
  choice = environ.get(ENV, "system") or "system"
  if choice == "system" or not sys.platform.startswith("linux"):
    return None
  if choice == "tcmalloc":
    library = find()
    if library is None:
      raise ValueError(
        f"{ENV}=tcmalloc, but no {' or '.join(_NAMES)} is in {', '.join(_DIRS)}; install it "
        f"(Debian/Ubuntu: apt-get install libtcmalloc-minimal4), give its path, or set "
        f"{ENV}=system."
      )
  elif os.path.isfile(choice):
    library = choice
  else:
    raise ValueError(
      f"{ENV}={choice!r} is not a file; give a malloc library's path, 'tcmalloc' or 'system'."
    )
  preloaded = environ.get("LD_PRELOAD", "")
  if library in _preloaded(preloaded):
    return None
  return {**environ, "LD_PRELOAD": f"{library} {preloaded}".strip()}


def rerun_with_chosen_malloc() -> None:
  """Replaces this process by itself with the chosen malloc preloaded, if ``preload_env`` says so.

  Call first thing in a command-line entry point, never in a library function: the process
  restarts with the same command line.
  """
  try:
    env = preload_env(os.environ)
  except ValueError as e:
    sys.exit(str(e))
  if env is None:
    return
  library = env["LD_PRELOAD"].split()[0]
  print(f"Using {library} as malloc ({ENV}).", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def active() -> str:
  """The library from ``LD_PRELOAD`` this process has mapped (the first), else ``system``."""
  try:
    with open("/proc/self/maps") as f:
      mapped = {line.split()[-1] for line in f if len(line.split()) >= 6}
  except OSError:
    return "system"
  for library in _preloaded(os.environ.get("LD_PRELOAD", "")):
    if os.path.realpath(library) in mapped:
      return library
  return "system"
