"""README's quadratic figures are what the code prints: the shipped ``quadratic`` optimizer's row,
and the tuned baselines of the quickstart's table (the same 256 test problems).

The quickstart's own LSTM figure needs its 3,000 meta-steps (~2 min on 2 busy cores), too long
for a test: ``python -m benchmarks.check_readme`` re-checks it, with BUILD.md's row.
"""

import pytest
from cli_checks import run

from benchmarks import check_readme


def test_the_checker_runs_the_quickstart_as_readme_writes_it():
  commands = check_readme.quickstart_commands(check_readme.read("README.md"), "/w/q")
  assert commands == [
    ["python", "-m", "train.meta_train", "--output_dir=/w/q"],
    ["python", "-m", "eval.evaluate", "--checkpoint=/w/q", "--output_dir=/w/q/eval"],
  ]


def test_figures_agree_at_the_digits_quoted():
  assert check_readme.agrees("0.125", 0.1254) and check_readme.agrees("0.1254", 0.1254)
  assert not check_readme.agrees("0.124", 0.1254) and not check_readme.agrees("0.121", 0.1254)
  table = check_readme.printed_table(
    "lstm: final loss 0.1254 (3 s)\n"
    "optimizer               lr    final mean    stderr      median  diverged\n"
    "lstm                     -        0.1254     0.021    0.007759         0\n"
    "adam                  1.05        0.3314     0.043     0.03169         0\n"
    "Wrote runs/quadratic/eval/results.json and runs/quadratic/eval/curves.png\n"
  )
  assert table == {"lstm": (0.1254, 0.021), "adam": (0.3314, 0.043)}
  lines = check_readme.compare("R", {"lstm": ("0.124", "0.021")}, table)
  assert lines == [
    "DIFFERS R: lstm mean quoted 0.124, printed 0.1254",
    "ok      R: lstm stderr quoted 0.021, printed 0.021",
  ]


@pytest.mark.slow
def test_readmes_shipped_quadratic_and_quickstart_baselines_are_what_evaluate_prints(tmp_path):
  result = run(
    ["eval.evaluate", "--checkpoint=pretrained:quadratic", f"--output_dir={tmp_path}",
     "--baselines=adam,nag"]
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  table = check_readme.printed_table(result.stdout)
  quoted = check_readme.readme_figures(check_readme.read("README.md"))
  build = check_readme.build_figures(check_readme.read("BUILD.md"))
  lines = check_readme.compare("README shipped quadratic", quoted["shipped"], table)
  lines += check_readme.compare("README results row", {"adam": quoted["quickstart"]["adam"]}, table)
  lines += check_readme.compare("BUILD.md", {k: build[k] for k in ("adam", "nag")}, table)
  assert len(lines) == 7 and all(line.startswith("ok") for line in lines), "\n".join(lines)
