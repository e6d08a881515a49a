"""Fault injection for the resume promise: a job stopped at every file-system mutation resumes to
exactly the outputs of an uninterrupted run.

Test-only; production code has no hook. Inside a job's process ``FaultHook`` wraps the functions
that change files (``os.mkdir``, ``os.open`` with create or truncate, ``builtins.open`` for
writing and each ``write`` of such a file, ``os.replace``, ``os.rename``, ``os.remove``,
``os.unlink``, ``os.rmdir``, ``os.truncate``; ``shutil.rmtree`` and ``tempfile`` go through
these) and counts each call that touches the run's output directory. At the k-th mutation it
either

- ``kill``s the process with SIGKILL just before the mutation (for a ``write``: after half of its
  bytes reached the file, a torn write), or
- ``snapshot``s the output directory as that kill would leave it and carries on, so one run
  yields the disk state of every kill point.

``python tests/fs_faults.py SPEC.json`` is the driver: it imports the library once, then forks a
child per job (no JAX backend exists before the fork, so forking is safe), so each job costs a
trace and a compile-cache hit instead of a new interpreter. It runs the reference job in snapshot
mode, resumes every snapshot in its own child, kills real jobs at the points ``kills`` names (to
check that a snapshot is what a kill leaves), and prints a JSON summary of every mismatch. With
``"mode": "export"`` in the spec it does the same for ``train.export`` (``main_export``).
"""

import builtins
import json
import os
import shutil
import signal
import sys
import traceback

_REAL = {
  name: getattr(os, name)
  for name in ("mkdir", "open", "replace", "rename", "remove", "unlink", "rmdir", "truncate")
}
_REAL_OPEN = builtins.open
_WRITE_MODES = ("w", "a", "x", "+")


class FaultHook:
  """Counts file-system mutations under ``root``; kills or snapshots at chosen ones.

  Args:
    root: the run's output directory (absolute); mutations elsewhere are not counted.
    mode: ``"kill"`` (SIGKILL at mutation ``at``), ``"snapshot"`` (copy ``root`` to
      ``snapshots/NNNN`` before every mutation) or ``"count"``.
    at: the 1-based mutation to kill at, in kill mode.
    snapshots: where snapshot mode puts its copies.
  """

  def __init__(self, root, mode="count", at=0, snapshots=None):
    self.root, self.mode, self.at, self.snapshots = os.path.abspath(root), mode, at, snapshots
    self.events = []  # (kind, path relative to root)
    self._busy = False

  def _mine(self, path, dir_fd=None) -> str | None:
    if self._busy or isinstance(path, int):
      return None
    path = os.fsdecode(path)
    if dir_fd is not None:
      path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    path = os.path.abspath(path)
    if path == self.root or path.startswith(self.root + os.sep):
      return os.path.relpath(path, self.root)
    return None

  def _event(self, kind, rel, before=None):
    """Called just before mutation ``kind`` of ``rel``; ``before`` does a torn part of it."""
    self.events.append((kind, rel))
    k = len(self.events)
    if self.mode == "kill" and k == self.at:
      if before:
        before()
      os.kill(os.getpid(), signal.SIGKILL)
    if self.mode == "snapshot":
      if before:
        before()
      self._snapshot(k)

  def _snapshot(self, k):
    self._busy = True
    try:
      target = os.path.join(self.snapshots, f"{k:04d}", os.path.basename(self.root))
      os.makedirs(os.path.dirname(target))
      if os.path.exists(self.root):
        shutil.copytree(self.root, target, symlinks=True)
    finally:
      self._busy = False

  def install(self):
    hook = self

    def path_call(name, kind):
      real = _REAL[name]

      def wrapped(path, *args, dir_fd=None, **kwargs):
        rel = hook._mine(path, dir_fd)
        if rel is not None and not (kind == "mkdir" and os.path.lexists(path)):
          hook._event(kind, rel)
        if dir_fd is not None:
          kwargs["dir_fd"] = dir_fd
        return real(path, *args, **kwargs)

      return wrapped

    def move_call(name):
      real = _REAL[name]

      def wrapped(src, dst, *args, **kwargs):
        rel = hook._mine(dst, kwargs.get("dst_dir_fd")) or hook._mine(src, kwargs.get("src_dir_fd"))
        if rel is not None:
          hook._event(name, rel)
        return real(src, dst, *args, **kwargs)

      return wrapped

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
      rel = hook._mine(path, dir_fd)
      exists = os.path.lexists(path) if dir_fd is None else True
      if rel is not None and ((flags & os.O_CREAT and not exists) or flags & os.O_TRUNC):
        hook._event("create", rel)
      return _REAL["open"](path, flags, mode, dir_fd=dir_fd)

    def builtin_open(file, mode="r", *args, **kwargs):
      rel = None if isinstance(file, int) else hook._mine(file)
      writing = any(m in mode for m in _WRITE_MODES)
      if rel is not None and writing:
        if "a" not in mode or not os.path.lexists(file):
          hook._event("create", rel)
      f = _REAL_OPEN(file, mode, *args, **kwargs)
      return _TornWriter(f, rel, hook) if rel is not None and writing else f

    os.mkdir = path_call("mkdir", "mkdir")
    os.remove = path_call("remove", "unlink")
    os.unlink = path_call("unlink", "unlink")
    os.rmdir = path_call("rmdir", "rmdir")
    os.truncate = path_call("truncate", "truncate")
    os.replace = move_call("replace")
    os.rename = move_call("rename")
    os.open = os_open
    builtins.open = builtin_open
    return self


class _TornWriter:
  """A file opened for writing whose every ``write`` is a mutation (a kill tears it in half)."""

  def __init__(self, f, rel, hook):
    self._f, self._rel, self._hook, self._done = f, rel, hook, 0

  def write(self, data):
    half = len(data) // 2

    def torn():
      self._f.write(data[:half])
      self._f.flush()
      self._done = half

    self._done = 0
    self._hook._event("write", self._rel, torn)
    return self._done + self._f.write(data[self._done :])

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._f.__exit__(*exc)

  def __iter__(self):
    return iter(self._f)


# ---- comparing output directories -------------------------------------------------------------


def _normalized(rel, data):
  """A file's content with what legitimately differs between two runs (paths, timing) removed."""
  name = os.path.basename(rel)
  if ".tmp-*" in rel:  # a write in progress, removed on resume; its bytes hold the run's path
    return "temporary"
  if rel == ".lock":  # the run lock (train.run_lock.RunLock): its holder's pid, host, start time
    return "lock"
  if name == "config.json":
    value = json.loads(data)
    value.pop("output_dir", None)
    return value
  if name == "optimizer.json":
    value = json.loads(data)
    value.get("metadata", {}).get("run_config", {}).pop("output_dir", None)
    return value
  if name == "metrics.jsonl":
    records = []
    for line in data.decode(errors="replace").splitlines(keepends=True):
      try:
        record = json.loads(line)
      except ValueError:
        record = "torn" if not line.endswith("\n") else f"unparsable {line!r}"
      if isinstance(record, dict):
        record.pop("steps_per_sec", None)
      records.append(record)
    return records
  return data


def _canonical(rel):
  """A relative path with the random part of temporary names (``.tmp-XXXXXXXX``) removed."""
  return os.sep.join(".tmp-*" if p.startswith(".tmp-") else p for p in rel.split(os.sep))


def tree(root):
  """``{relative path: normalized content}`` of every file and directory under ``root``."""
  out = {}
  if not os.path.isdir(root):
    return out
  for parent, dirs, files in os.walk(root):
    for name in dirs:
      out[_canonical(os.path.relpath(os.path.join(parent, name), root)) + "/"] = None
    for name in files:
      rel = _canonical(os.path.relpath(os.path.join(parent, name), root))
      with _REAL_OPEN(os.path.join(parent, name), "rb") as f:
        data = f.read()
      try:
        out[rel] = _normalized(rel, data)
      except ValueError as e:
        out[rel] = f"unparsable: {e}"
    dirs.sort()
  return out


def _raw_tree(root):
  """``{relative path: bytes}`` of the files under ``root`` (sorted), for exact comparison."""
  out = []
  for parent, dirs, files in os.walk(root):
    dirs.sort()
    out.append((os.path.relpath(parent, root), None))
    for name in sorted(files):
      with _REAL_OPEN(os.path.join(parent, name), "rb") as f:
        out.append((os.path.relpath(os.path.join(parent, name), root), f.read()))
  return out


def differences(got, want) -> list[str]:
  problems = [f"extra {p}" for p in sorted(set(got) - set(want))]
  problems += [f"missing {p}" for p in sorted(set(want) - set(got))]
  problems += [f"differs {p}" for p in sorted(set(got) & set(want)) if got[p] != want[p]]
  return problems


# ---- the driver ---------------------------------------------------------------------------------


def _child(fn) -> int:
  """Runs ``fn`` in a forked child; its exit status (negative: killed by that signal)."""
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    code = 0
    try:
      fn()
    except BaseException:
      traceback.print_exc()
      code = 1
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  _, status = os.waitpid(pid, 0)
  return os.waitstatus_to_exitcode(status)


def main(spec_path):
  with _REAL_OPEN(spec_path) as f:
    spec = json.load(f)
  import jax

  for name, value in spec.get("jax_config", {}).items():
    jax.config.update(name, value)
  import learned_opt
  from train import trainer
  from train.config import MetaTrainConfig

  work = spec["work"]
  quiet = lambda s: None

  def config(output_dir):
    return MetaTrainConfig(output_dir=output_dir, **spec["config"])

  def run(output_dir, hook=None):
    if hook:
      hook.install()
    trainer.train(config(output_dir), log=quiet)

  reference = os.path.join(work, "reference", "run")
  snapshots = os.path.join(work, "snapshots")
  events_path = os.path.join(work, "events.json")

  def record():
    hook = FaultHook(reference, "snapshot", snapshots=snapshots)
    run(reference, hook)
    with _REAL_OPEN(events_path, "w") as f:
      json.dump(hook.events, f)

  failures = []
  if _child(record) != 0:
    print(json.dumps({"failures": ["the reference run failed"]}))
    return
  with open(events_path) as f:
    events = json.load(f)
  want = tree(reference)

  resumed = []

  def check_and_resume(run_dir, k):
    resumed.append(k)

    def go():
      if os.path.exists(os.path.join(run_dir, "optimizer.json")):
        _, phi = learned_opt.load(run_dir)  # the best phi so far, whatever was in flight
      run(run_dir)

    status = _child(go)
    if status != 0:
      failures.append(f"kill point {k} {events[k - 1]}: resume exited {status}")
      return
    problems = differences(tree(run_dir), want)
    if problems:
      failures.append(f"kill point {k} {events[k - 1]}: " + "; ".join(problems))

  snapshot_of = lambda k: os.path.join(snapshots, f"{k:04d}", "run")
  kill_trees = {k: tree(snapshot_of(k)) for k in spec.get("kills", [])}  # before resuming them
  saved_before, previous = False, None
  for k in range(1, len(events) + 1):
    run_dir = snapshot_of(k)
    saved = os.path.exists(os.path.join(run_dir, "optimizer.json"))
    if saved_before and not saved:
      failures.append(f"kill point {k} {events[k - 1]}: the saved optimizer is gone")
    saved_before = saved
    # A kill point leaving the same files as the one before it (say, a file created empty and
    # then truncated) resumes the same way: the job is deterministic.
    raw = _raw_tree(run_dir)
    if raw != previous:
      check_and_resume(run_dir, k)
    previous = raw

  for k in spec.get("kills", []):
    run_dir = os.path.join(work, "kills", f"{k:04d}", "run")
    status = _child(lambda d=run_dir, k=k: run(d, FaultHook(d, "kill", at=k)))
    if status != -signal.SIGKILL:
      failures.append(f"real kill at {k}: the job exited {status}, not by SIGKILL")
      continue
    problems = differences(tree(run_dir), kill_trees[k])
    if problems:
      failures.append(f"real kill at {k} left other files than its snapshot: {problems}")
    check_and_resume(run_dir, k)

  print(json.dumps({"events": events, "resumed": resumed, "failures": failures}))


# ---- train.export under kills -------------------------------------------------------------------


def main_export(spec):
  """``train.export`` killed at every mutation of its ``--output`` and rerun.

  Trains the run once, then for each scenario (``fresh``: into a new directory; ``overwrite``:
  ``--overwrite`` of an export of the run's oldest checkpoint) records the uninterrupted export
  in snapshot mode. At each kill point the output must load (as the old optimizer or the new)
  once a record exists, and rerunning the same export must leave exactly the uninterrupted
  export's bytes.
  """
  from train import checkpoint, trainer
  from train.config import MetaTrainConfig

  run = os.path.join(spec["work"], "run")
  config = MetaTrainConfig(output_dir=run, **spec["config"])
  if _child(lambda: trainer.train(config, log=lambda s: None)):
    return {"kill_points": {}, "failures": ["the training run failed"]}
  oldest = checkpoint.all_steps(os.path.join(run, "checkpoints"))[0]
  summary = {"kill_points": {}, "failures": []}
  for scenario in ("fresh", "overwrite"):
    _export_scenario(spec, run, oldest, scenario, summary)
  return summary


def _export_scenario(spec, run, oldest, scenario, summary):
  import learned_opt
  from learned_opt import tree_files
  from train import export

  base, quiet = os.path.join(spec["work"], scenario), lambda s: None
  overwrite = scenario == "overwrite"
  reference = os.path.join(base, "reference", "out")
  snapshots = os.path.join(base, "snapshots")
  events_path = os.path.join(base, "events.json")

  def prepare(out):
    if overwrite:  # the optimizer the export replaces
      export.export(run, out, step=oldest, log=quiet)

  def job(out, hook=None):
    if hook:
      hook.install()
    export.export(run, out, overwrite=overwrite, log=quiet)

  def record():
    prepare(reference)
    hook = FaultHook(reference, "snapshot", snapshots=snapshots)
    job(reference, hook)
    with _REAL_OPEN(events_path, "w") as f:
      json.dump(hook.events, f)

  if _child(record) != 0:
    summary["failures"].append(f"{scenario}: the reference export failed")
    return
  with _REAL_OPEN(events_path) as f:
    events = json.load(f)
  summary["kill_points"][scenario] = len(events)
  want = _raw_tree(reference)
  records = [os.path.join(reference, "optimizer.json")]  # the new optimizer's ...
  if overwrite:  # ... and the one it replaces
    records.append(os.path.join(snapshots, "0001", "out", "optimizer.json"))
  digests = set()
  for path in records:
    with _REAL_OPEN(path) as f:
      digests.add(json.load(f)["weights_sha256"])

  def check_and_rerun(out, label):
    def go():
      if os.path.exists(os.path.join(out, "optimizer.json")):
        loaded = learned_opt.load(out)  # whatever was in flight
        assert tree_files.encode(loaded.meta_params)[1] in digests, "loaded another phi"
      job(out)

    status = _child(go)
    if status != 0:
      summary["failures"].append(f"{scenario} {label}: the rerun exited {status}")
    elif _raw_tree(out) != want:
      summary["failures"].append(f"{scenario} {label}: the rerun left other bytes")

  snapshot_of = lambda k: os.path.join(snapshots, f"{k:04d}", "out")
  kills = [k for k in spec.get("kills", []) if k <= len(events)]  # scenarios differ in length
  kill_trees = {k: tree(snapshot_of(k)) for k in kills}  # before rerunning them
  previous = False
  for k in range(1, len(events) + 1):
    out = snapshot_of(k)
    raw = _raw_tree(out) if os.path.isdir(out) else None
    if raw != previous:  # the same files as the kill point before rerun the same way
      check_and_rerun(out, f"kill point {k} {events[k - 1]}")
    previous = raw
  for k in kills:
    out = os.path.join(base, "kills", f"{k:04d}", "out")

    def killed(out=out, k=k):
      prepare(out)
      job(out, FaultHook(out, "kill", at=k))

    status = _child(killed)
    if status != -signal.SIGKILL:
      summary["failures"].append(f"{scenario} real kill at {k}: exited {status}, not SIGKILL")
      continue
    problems = differences(tree(out), kill_trees[k])
    if problems:
      summary["failures"].append(f"{scenario} real kill at {k} left other files: {problems}")
    check_and_rerun(out, f"real kill at {k}")


def _setup(spec):
  import jax

  for name, value in spec.get("jax_config", {}).items():
    jax.config.update(name, value)


if __name__ == "__main__":
  with _REAL_OPEN(sys.argv[1]) as f:
    _spec = json.load(f)
  if _spec.get("mode") == "export":
    _setup(_spec)
    print(json.dumps(main_export(_spec)))
  else:
    main(sys.argv[1])
