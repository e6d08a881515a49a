"""What the kernel cache trusts: files and directories no other user could have written.

Loading a shared library runs its code, so ``learned_opt.kernels.build`` loads a cached kernel
only if the cache directory and every directory above it are owned by this user or root and not
writable by group or others (an ancestor with the sticky bit, like ``/tmp``, may be), and so are
the library and its sidecar ``NAME.so.sha256`` (the SHA-256 recorded when it was built), which
the library's bytes must match. Anything else raises ``UntrustedCache`` with the fix, or (a
missing, truncated or mismatched library) reads as absent, so that it is rebuilt.
"""

import errno
import os
import stat
import tempfile

from learned_opt import tree_files

CACHE_ENV_VAR = "LEARNED_OPT_CACHE"
SIDECAR_SUFFIX = ".sha256"  # NAME.so.sha256 beside NAME.so, in sha256sum's format
# Reading a cached file: never through a symbolic link, never blocking on a FIFO planted there.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class UntrustedCache(RuntimeError):
  """Another user could have written a cached kernel or its directory; the message says how to
  fix it."""


def trusted_owners() -> tuple[int, int]:
  """This process's user and root: the only owners whose files it may run."""
  return (os.geteuid(), 0)


def _writers(mode: int) -> str:
  """Who besides the owner may write, from a mode with group or other write bits."""
  both = mode & stat.S_IWGRP and mode & stat.S_IWOTH
  return "group and others" if both else "group" if mode & stat.S_IWGRP else "others"


def ownership_problem(path: str, st: os.stat_result, kind: str, sticky_ok: bool = False):
  """Why another user could have written ``path`` (``st`` its lstat), or None.

  ``kind`` is ``"file"`` (a regular file) or ``"directory"``. With ``sticky_ok`` a directory
  with the sticky bit (like ``/tmp``) may be writable by others: they cannot rename or remove
  what is ours in it.
  """
  is_kind = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
  if not is_kind(st.st_mode):
    what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "something else"
    return f"{path} is {what}, not a {kind}"
  if st.st_uid not in trusted_owners():
    return f"{path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or root"
  mode = stat.S_IMODE(st.st_mode)
  if mode & (stat.S_IWGRP | stat.S_IWOTH) and not (sticky_ok and mode & stat.S_ISVTX):
    return f"{path} is writable by {_writers(mode)} (mode {mode:04o})"
  return None


def directory_problem(directory: str) -> tuple[str, str] | None:
  """The directory another user could put files into and why: ``directory`` (resolved) or one
  above it, whose writer could rename it and swap in a tree of their own. None if private.

  Only ``directory`` itself, where the files are, must not be sticky and writable by others.
  """
  path = directory
  while True:
    problem = ownership_problem(path, os.lstat(path), "directory", sticky_ok=path != directory)
    if problem is not None:
      return path, problem
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def refusal(directory: str, found: tuple[str, str]) -> str:
  """The message for a cache directory that is not private: what is wrong and the fix."""
  path, problem = found
  if "writable by" in problem:
    fix = f"run `chmod go-w {path}`"
  else:
    fix = f"have {path} be a directory owned by you or root (`chown {os.geteuid()} {path}`)"
  return (
    f"the kernel cache {directory} is not private: {problem}, so another user could plant code "
    f"that this process would run, and nothing is loaded from it. To fix: {fix}, or set "
    f"${CACHE_ENV_VAR} to a directory of your own (e.g. `mkdir -m 700 ~/.kernel_cache` and "
    f"`export {CACHE_ENV_VAR}=~/.kernel_cache`)"
  )


def checked(directory: str) -> str:
  """``directory`` resolved, if private.

  Raises:
    UntrustedCache: another user could write into it (``refusal``).
  """
  directory = os.path.realpath(directory)
  found = directory_problem(directory)
  if found is not None:
    raise UntrustedCache(refusal(directory, found))
  return directory


def make_private_dirs(directory: str) -> None:
  """Creates ``directory`` and any missing parent with mode 0o700.

  Not ``os.makedirs``: it gives only the last directory the mode, its parents the umask's.
  """
  missing = []
  path = directory
  while not os.path.isdir(path):
    missing.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  for path in reversed(missing):
    try:
      os.mkdir(path, 0o700)
    except FileExistsError:
      pass  # made meanwhile by another process, or a file in the way: checked below
  if not os.path.isdir(directory):
    raise NotADirectoryError(errno.ENOTDIR, "not a directory", directory)


def private_directory(directory: str) -> str:
  """``directory`` resolved, created (0o700) where missing and checked private (``checked``).

  One that cannot be created (a file in the way, a read-only disk) gives a fresh private
  temporary directory instead, for this process only.

  Raises:
    UntrustedCache: another user could write into it (``refusal``).
  """
  directory = os.path.realpath(directory)
  try:
    make_private_dirs(directory)
  except OSError:
    directory = tempfile.mkdtemp(prefix="learned_opt_kernels_")
  return checked(directory)


def read_trusted(path: str) -> bytes | None:
  """The bytes of the regular file ``path`` if this user or root wrote it; None if missing.

  Checked on the open descriptor (``fstat``), so the bytes are those of the file checked.

  Raises:
    UntrustedCache: it is not a regular file, is another user's, or others may write it.
  """
  try:
    handle = os.open(path, READ_FLAGS)
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symbolic link
      raise UntrustedCache(untrusted(path, f"{path} is a symbolic link")) from e
    raise UntrustedCache(f"reading the cached kernel {path} failed ({e})") from e
  with os.fdopen(handle, "rb") as f:
    problem = ownership_problem(path, os.fstat(f.fileno()), "file")
    if problem is not None:
      raise UntrustedCache(untrusted(path, problem))
    return f.read()


def untrusted(path: str, problem: str) -> str:
  """The message for a cached file someone else may have written: not loaded, and the fix."""
  library = path.removesuffix(SIDECAR_SUFFIX)
  return (
    f"the cached kernel {library} is not trusted and is not loaded: {problem}. Files this "
    f"process builds are yours and not writable by others, so check how it got there, then "
    f"delete it (`rm -f {library} {library}{SIDECAR_SUFFIX}`) and it is rebuilt"
  )


def verified(path: str) -> bytes | None:
  """The library at ``path`` if its bytes match its trusted sidecar's SHA-256, else None.

  None (rebuild) for a missing or truncated library, a missing sidecar or a mismatch: what an
  interrupted build or a corrupted disk leaves.

  Raises:
    UntrustedCache: the library or its sidecar is not trusted (``read_trusted``).
  """
  content = read_trusted(path)
  recorded = read_trusted(path + SIDECAR_SUFFIX)
  if content is None or recorded is None:
    return None
  fields = recorded.split()
  return (
    content
    if fields and fields[0].decode("ascii", "replace") == tree_files.sha256(content)
    else None
  )
