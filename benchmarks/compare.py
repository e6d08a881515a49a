r"""Same-run comparisons of ``benchmarks.perf`` workloads against an earlier commit (run by hand).

  python -m benchmarks.compare [--before=3c9a684] [--workloads=art64,mnist2] [--rounds=2]
      [--repeats=5] [--json=runs/compare.json]

A shared VM's speed drifts by tens of percent within an hour (BUILD.md), so a before/after ratio
means something only when both trees run side by side. This checks ``--before`` out into a
temporary git worktree, copies this tree's ``benchmarks/perf.py`` and ``benchmarks/peak.py`` into
it (both sides are measured by the same code), and runs ``benchmarks.perf`` one workload at a time,
alternating the trees, ``--rounds`` times. It prints, round by round, both trees' wall and CPU
milliseconds a meta-step and their ratio, then the median ratios (before / now); the worktree is
removed at the end. Data sets and weights come from the environment, as for ``benchmarks.perf``
(``MNIST_DIR``, ``CIFAR10_DIR``, ``$VGG16_WEIGHTS``); ``$LEARNED_OPT_BACKEND`` and
``$LEARNED_OPT_MALLOC`` apply to both trees.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string("before", "3c9a684", "The commit to compare with (any git revision).")
flags.DEFINE_list("workloads", ["art64"], "benchmarks.perf workloads, run one at a time.")
flags.DEFINE_integer("rounds", 2, "Runs of each tree per workload, interleaved.")
flags.DEFINE_integer("repeats", 5, "benchmarks.perf --repeats.")
flags.DEFINE_string("json", None, "Write every run's result and the ratios here.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURING_CODE = ("benchmarks/perf.py", "benchmarks/peak.py")


def checkout(revision: str, directory: str, root: str = ROOT) -> None:
  """``revision`` of the repository at ``root`` as a detached worktree at ``directory``, with
  ``root``'s ``MEASURING_CODE`` copied in. ValueError (git's message) for an unknown revision."""
  out = subprocess.run(
    ["git", "-C", root, "worktree", "add", "--detach", directory, revision],
    capture_output=True,
    text=True,
    check=False,
  )
  if out.returncode:
    raise ValueError(f"cannot check out {revision!r}: {out.stderr.strip()}")
  for path in MEASURING_CODE:
    shutil.copyfile(os.path.join(root, path), os.path.join(directory, path))


def remove(directory: str, root: str = ROOT) -> None:
  """Removes a worktree ``checkout`` made, and git's record of it."""
  subprocess.run(["git", "-C", root, "worktree", "remove", "--force", directory], check=False)


def run_perf(tree: str, workload: str, repeats: int) -> dict | None:
  """``benchmarks.perf``'s result for one workload run in ``tree``; None (stderr's tail
  printed) if it failed."""
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, "perf.json")
    command = [sys.executable, "-m", "benchmarks.perf", f"--workloads={workload}"]
    command += [f"--repeats={repeats}", f"--json={path}"]
    out = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    results = []
    if out.returncode == 0 and os.path.exists(path):
      with open(path) as f:
        results = json.load(f)["results"]
    if not results:
      print(f"{workload} in {tree}: failed\n{out.stdout[-1000:]}{out.stderr[-2000:]}")
      return None
    return results[0]


def ratios(pairs: list[tuple[dict, dict]]) -> dict:
  """Before / now of the wall and CPU seconds of each (before, now) pair, and their medians.

  Args:
    pairs: per round, two ``benchmarks.perf`` results with ``seconds`` and ``cpu_seconds``.
  """
  wall = [before["seconds"] / now["seconds"] for before, now in pairs]
  cpu = [before["cpu_seconds"] / now["cpu_seconds"] for before, now in pairs]
  return {
    "wall": wall,
    "cpu": cpu,
    "median_wall": statistics.median(wall),
    "median_cpu": statistics.median(cpu),
  }


def interleaved(before_tree: str, workload: str, rounds: int, repeats: int) -> list:
  """``rounds`` (before, now) pairs of ``run_perf`` results, each printed; failed rounds left
  out."""
  pairs = []
  for _ in range(rounds):
    before = run_perf(before_tree, workload, repeats)
    now = run_perf(ROOT, workload, repeats)
    if before is None or now is None:
      continue
    pairs.append((before, now))
    print(
      f"{workload}: before {before['seconds'] * 1e3:,.1f} ms "
      f"({before['cpu_seconds'] * 1e3:,.1f} CPU), now {now['seconds'] * 1e3:,.1f} ms "
      f"({now['cpu_seconds'] * 1e3:,.1f} CPU): {before['seconds'] / now['seconds']:.2f}x",
      flush=True,
    )
  return pairs


def main(argv):
  del argv
  if FLAGS.rounds < 1:
    raise app.UsageError(f"--rounds must be at least 1, got {FLAGS.rounds}.")
  record = {"before": FLAGS.before, "workloads": {}}
  with tempfile.TemporaryDirectory() as parent:
    before_tree = os.path.join(parent, "before")
    try:
      checkout(FLAGS.before, before_tree)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    try:
      for workload in FLAGS.workloads:
        pairs = interleaved(before_tree, workload, FLAGS.rounds, FLAGS.repeats)
        if not pairs:
          continue
        summary = ratios(pairs)
        print(
          f"{workload}: {FLAGS.before} / now, median over {len(pairs)} rounds: wall "
          f"{summary['median_wall']:.2f}x, CPU {summary['median_cpu']:.2f}x"
        )
        record["workloads"][workload] = {"runs": pairs, **summary}
    finally:
      remove(before_tree)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
