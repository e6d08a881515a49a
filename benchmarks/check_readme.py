r"""README's quickstart figures against what the code prints today (run by hand: ~1.5 min, 2 cores).

  python -m benchmarks.check_readme

Runs README's first command as written, less its ``pip install -e . &&`` and with
``runs/quadratic`` replaced by a new temporary folder (removed at the end): meta-training on 10-d
quadratics, then the evaluation that prints the table. Then ``eval.evaluate
--checkpoint=pretrained:quadratic``. Compares, at the digits each document quotes:

- README's results row for section 3.1 (``step 100: LSTM a ± b vs best-tuned Adam c ± d``) with
  the quickstart's printed LSTM and Adam rows (final mean and standard error);
- BUILD.md's quickstart row (``LSTM x, Adam y, NAG z``) with the same table;
- README's row of the shipped ``quadratic`` optimizer (``a vs tuned Adam b (tuned NAG c)``) with
  the shipped optimizer's table (``tests/test_readme_figures.py`` pins this one in the slow tier;
  the quickstart's meta-training alone is too long for a test).

Prints each comparison and the quickstart's wall time (meta-training and evaluation, no install);
exits 1 if any figure disagrees.
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_DIR = "runs/quadratic"  # where README's command writes
NUMBER = r"(\d+\.\d+)"


def read(name: str) -> str:
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def quickstart_commands(readme: str, work: str) -> list[list[str]]:
  """README's first command, split at ``&&``, without the install, writing under ``work``."""
  block = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
  commands = [shlex.split(part) for part in block.strip().split("&&")]
  commands = [c for c in commands if c[:2] != ["pip", "install"]]
  return [[a.replace(QUICKSTART_DIR, work) for a in c] for c in commands]


def readme_figures(readme: str) -> dict[str, dict[str, tuple[str, ...]]]:
  """The figures README quotes, as written: ``{"quickstart": {"lstm": (mean, stderr), "adam":
  (mean, stderr)}, "shipped": {"lstm": (mean,), "adam": (mean,), "nag": (mean,)}}``."""
  row = re.search(
    rf"step 100: LSTM {NUMBER} ± {NUMBER} vs best-tuned Adam {NUMBER} ± {NUMBER}", readme
  )
  shipped = re.search(
    rf"\| `quadratic` \|[^\n]*?held-out quadratics: {NUMBER} vs tuned Adam {NUMBER} "
    rf"\(tuned NAG {NUMBER}\)",
    readme,
  )
  if row is None or shipped is None:
    raise ValueError("README.md no longer quotes the quickstart's or the shipped row's figures.")
  return {
    "quickstart": {"lstm": row.group(1, 2), "adam": row.group(3, 4)},
    "shipped": {"lstm": (shipped[1],), "adam": (shipped[2],), "nag": (shipped[3],)},
  }


def build_figures(build: str) -> dict[str, tuple[str, ...]]:
  """BUILD.md's quickstart row: ``{"lstm": (mean,), "adam": (mean,), "nag": (mean,)}``."""
  found = re.search(rf"quickstart:[^\n]*LSTM {NUMBER}, Adam {NUMBER}, NAG {NUMBER}", build)
  if found is None:
    raise ValueError("BUILD.md no longer quotes the quickstart's figures.")
  return {"lstm": (found[1],), "adam": (found[2],), "nag": (found[3],)}


def printed_table(stdout: str) -> dict[str, tuple[float, float]]:
  """``eval.evaluate``'s printed table: ``{optimizer: (final mean, stderr)}``."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["optimizer", "lr"])
  rows = {}
  for line in lines[start + 1 :]:
    cells = line.split()
    if len(cells) != 6:
      break
    rows[cells[0]] = (float(cells[2]), float(cells[3]))
  return rows


def agrees(quoted: str, value: float) -> bool:
  """``value`` rounded to ``quoted``'s decimals is ``quoted``."""
  return f"{value:.{len(quoted.split('.')[1])}f}" == quoted


def compare(where: str, quoted: dict[str, tuple[str, ...]], table: dict) -> list[str]:
  """One line per figure, ``ok`` or ``DIFFERS``: the quoted mean (and stderr) against the table."""
  lines = []
  for name, figures in quoted.items():
    for what, figure, value in zip(("mean", "stderr"), figures, table[name], strict=False):
      verdict = "ok" if agrees(figure, value) else "DIFFERS"
      lines.append(f"{verdict:8}{where}: {name} {what} quoted {figure}, printed {value:.4g}")
  return lines


def run(argv: list[str]) -> str:
  result = subprocess.run(
    [sys.executable, "-m", *argv[2:]] if argv[:2] == ["python", "-m"] else argv,
    cwd=ROOT, capture_output=True, text=True, check=False,
  )  # fmt: skip
  if result.returncode != 0:
    raise SystemExit(f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}")
  return result.stdout


def main() -> None:
  if sys.argv[1:]:
    raise SystemExit(__doc__)
  with tempfile.TemporaryDirectory(prefix="check_readme.") as work:
    check(work)


def check(work: str) -> None:
  """Runs the commands under ``work`` and prints the comparisons; exits 1 on a difference."""
  readme = read("README.md")
  quoted = readme_figures(readme)
  tic, stdout = time.time(), ""
  for argv in quickstart_commands(readme, os.path.join(work, "quadratic")):
    print(f"$ {shlex.join(argv)}", flush=True)
    stdout = run(argv)
  seconds = time.time() - tic
  quickstart = printed_table(stdout)  # the last command's: the evaluation
  shipped = printed_table(
    run(["python", "-m", "eval.evaluate", "--checkpoint=pretrained:quadratic",
         f"--output_dir={os.path.join(work, 'shipped')}", "--baselines=adam,nag"])
  )  # fmt: skip
  lines = compare("README results row", quoted["quickstart"], quickstart)
  lines += compare("BUILD.md quickstart", build_figures(read("BUILD.md")), quickstart)
  lines += compare("README shipped quadratic", quoted["shipped"], shipped)
  print("\n".join(lines))
  print(f"quickstart: {seconds:.0f} s (meta-training and evaluation, no install)")
  if any(line.startswith("DIFFERS") for line in lines):
    sys.exit(1)


if __name__ == "__main__":
  main()
