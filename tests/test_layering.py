"""Floors import downward only, and through faces (DESIGN.md, "The one picture").

``eval/`` and ``experiments/`` take from ``train/`` only its public face (``train.FACE``:
``inner``, ``distributed``, ``config``, ``command_line``, ``config_flags``, ``run``/``Run``;
experiments may also meta-train through ``trainer``); ``learned_opt/`` and ``tasks/`` import
none of ``train/``, ``eval/`` or ``experiments/``. Deferred imports inside functions count.
"""

import ast
import pathlib

import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS_ALSO = {"trainer"}  # an experiment may meta-train its own optimizer
# Imports from train/ outside the face that a rewrite in progress removes (eval engine, round 3).
# Each entry must still be there: delete it when its module stops importing the name.
PENDING: dict[str, set[str]] = {}


def train_names(path: pathlib.Path) -> set[str]:
  """What ``path`` takes from ``train``: the submodule or package-level name of each import.

  ``from train import inner`` and ``import train.inner`` -> ``inner``; ``from train.run import
  Run`` -> ``run``; ``from train import Run`` -> ``Run``; ``import train`` -> ``train``.
  """
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "train":
          names.add(parts[1] if len(parts) > 1 else "train")
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      parts = node.module.split(".")
      if parts[0] != "train":
        continue
      if len(parts) > 1:
        names.add(parts[1])
      else:
        names.update(alias.name for alias in node.names)
  return names


def imported_packages(path: pathlib.Path) -> set[str]:
  """Top-level packages ``path`` imports anywhere in its source (relative imports excluded)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      found.add(node.module.split(".")[0])
  return found


def _sources(folder: str) -> list[pathlib.Path]:
  return sorted((ROOT / folder).rglob("*.py"))


def test_train_names_reads_every_spelling(tmp_path):
  source = tmp_path / "m.py"
  source.write_text(
    "import train.inner\nfrom train import Run, config as c\nfrom train.run import Snapshot\n"
    "def f():\n  from train import trainer\n"
  )
  assert train_names(source) == {"inner", "Run", "config", "run", "trainer"}


def test_the_face_exists():
  for name in train.FACE:
    assert getattr(train, name, None) is not None or (ROOT / "train" / f"{name}.py").exists()
  assert train.Run.__module__ == "train.run"


def test_eval_and_experiments_use_train_only_through_its_face():
  outside = {}
  for folder, allowed in (
    ("eval", set(train.FACE)),
    ("experiments", {*train.FACE, *EXPERIMENTS_ALSO}),
  ):
    for path in _sources(folder):
      extra = train_names(path) - allowed
      rel = str(path.relative_to(ROOT))
      if extra != PENDING.get(rel, set()):
        outside[rel] = sorted(extra)  # (a PENDING entry no longer needed shows as its rest)
  assert not outside, (
    f"imports from train/ outside its face (train.FACE): {outside}. Use what train.FACE names, "
    "or add what is needed to the face in train/__init__.py."
  )


def test_lower_floors_never_import_upper_ones():
  upper = {"train", "eval", "experiments"}
  found = {
    str(path.relative_to(ROOT)): sorted(imported_packages(path) & upper)
    for folder in ("learned_opt", "tasks")
    for path in _sources(folder)
    if imported_packages(path) & upper
  }
  assert not found, f"a lower floor imports an upper one: {found}"
