"""The test pyramid (DESIGN.md, "Tests: a pyramid"): ``pytest -m "not slow"`` is the fast tier
(contracts, math references, units) and ``pytest -m slow`` the rest; together they run every test
once. Slow: a test that runs a meta-training job, sweeps an evaluation grid, injects faults, or
starts a process (a command line, a killed job, a multi-host launch, a C++ build in a fresh
interpreter: each pays a new interpreter, JAX's import and its own compiles) is marked
``@pytest.mark.slow``, or ``pytestmark = pytest.mark.slow`` for a module of such tests. The
process rule is checked here; the rest is judgement, kept honest by the fast tier's time that CI
prints.

Static (the test modules are read, not imported), so this guard costs well under a second.
"""

import ast
import configparser
import os
import shlex

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Calls that start a process: ``subprocess.run([...])``, ``os.fork()``, ...
_SPAWNS = {
  "subprocess": {"run", "Popen", "call", "check_call", "check_output", "getoutput"},
  "os": {"fork", "system", "popen", "execv", "execve", "spawnv", "posix_spawn"},
  "multiprocessing": {"Process", "Pool", "get_context"},
}
# The fast tier's core, which must never be marked slow.
_FAST_CORE = ("test_optimizer_contract.py", "test_preprocess.py", "test_unroll.py")


def _modules() -> dict[str, ast.Module]:
  """Every test module and test helper module in tests/, parsed, by module name."""
  trees = {}
  for name in sorted(os.listdir(TESTS)):
    if name.endswith(".py") and name != "conftest.py":
      with open(os.path.join(TESTS, name)) as f:
        trees[name[:-3]] = ast.parse(f.read(), name)
  return trees


def _is_slow(node: ast.AST) -> bool:
  """Whether an expression mentions ``pytest.mark.slow`` (alone, in a list, or in marks=)."""
  return any(
    isinstance(n, ast.Attribute)
    and n.attr == "slow"
    and isinstance(n.value, ast.Attribute)
    and n.value.attr == "mark"
    for n in ast.walk(node)
  )


def _module_is_slow(tree: ast.Module) -> bool:
  return any(
    isinstance(stmt, ast.Assign)
    and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets)
    and _is_slow(stmt.value)
    for stmt in tree.body
  )


def _is_fixture(fn: ast.FunctionDef) -> bool:
  return any("fixture" in ast.unparse(d) for d in fn.decorator_list)


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
  return {s.name: s for s in tree.body if isinstance(s, ast.FunctionDef)}


def _test_module_aliases(tree: ast.Module, modules) -> dict[str, str]:
  """``import test_multihost as multihost`` -> {"multihost": "test_multihost"}."""
  aliases = {}
  for stmt in tree.body:
    if isinstance(stmt, ast.Import):
      for alias in stmt.names:
        if alias.name in modules:
          aliases[alias.asname or alias.name] = alias.name
  return aliases


def _spawners(modules) -> set[tuple[str, str]]:
  """(module, function) pairs that start a process, directly or through another such function
  or a fixture of theirs, to a fixed point."""
  calls = {}  # (module, function) -> the (module, function)s and fixtures it uses
  spawners = set()
  for mod, tree in modules.items():
    functions = _functions(tree)
    aliases = _test_module_aliases(tree, modules)
    for name, fn in functions.items():
      uses = set()
      if name.startswith("test_") or _is_fixture(fn):  # its arguments are fixtures
        uses = {(mod, a.arg) for a in fn.args.args if a.arg in functions}
      for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
          continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
          uses.add((mod, f.id))
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
          if f.attr in _SPAWNS.get(f.value.id, ()):
            spawners.add((mod, name))
          elif f.value.id in aliases:
            uses.add((aliases[f.value.id], f.attr))
      calls[(mod, name)] = uses
  while True:
    more = {key for key, uses in calls.items() if uses & spawners} - spawners
    if not more:
      return spawners
    spawners |= more


def test_slow_marker_is_registered_and_strict():
  config = configparser.ConfigParser()
  config.read(os.path.join(ROOT, "setup.cfg"))
  pytest_section = config["tool:pytest"]
  assert "--strict-markers" in pytest_section.get("addopts", "").split()
  markers = [line.split(":")[0].strip() for line in pytest_section["markers"].splitlines()]
  assert "slow" in markers


def test_ci_runs_both_tiers():
  tiers = set()
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    for line in f:
      words = shlex.split(line, comments=True)
      if words[:3] == ["python3", "-m", "pytest"]:
        marks = words[words.index("-m", 3) + 1] if "-m" in words[3:] else None
        tiers |= {marks} if marks else {"not slow", "slow"}
  assert {"not slow", "slow"} <= tiers, tiers


def test_a_test_that_starts_a_process_is_slow():
  modules = _modules()
  spawners = _spawners(modules)
  fast = []
  for mod, tree in modules.items():
    if not mod.startswith("test_") or _module_is_slow(tree):
      continue
    for name, fn in _functions(tree).items():
      if name.startswith("test_") and (mod, name) in spawners:
        if not any(_is_slow(d) for d in fn.decorator_list):
          fast.append(f"tests/{mod}.py::{name}")
  assert not fast, (
    "these tests start a process but are in the fast tier; mark them @pytest.mark.slow (or the "
    f"module pytestmark = pytest.mark.slow): {fast}"
  )


def test_the_guard_sees_a_process_through_helpers_and_fixtures():
  source = (
    "import subprocess\n"
    "import pytest\n"
    "def launch(): return subprocess.Popen(['true'])\n"
    "def job(): return launch()\n"
    "@pytest.fixture\n"
    "def run(): return job()\n"
    "def test_fixture(run): pass\n"
    "def test_helper(): job()\n"
    "def test_plain(): pass\n"
    "def check(run): pass\n"  # an argument of a helper is not a fixture
    "def test_checks(): check(1)\n"
  )
  spawners = _spawners(
    {
      "test_x": ast.parse(source),
      "test_y": ast.parse("import test_x as x\ndef test_other(): x.launch()\n"),
    }
  )
  tests = {name for mod, name in spawners if name.startswith("test_")}
  assert tests == {"test_fixture", "test_helper", "test_other"}


@pytest.mark.parametrize("name", _FAST_CORE)
def test_the_contract_suite_and_math_references_stay_fast(name):
  with open(os.path.join(TESTS, name)) as f:
    tree = ast.parse(f.read(), name)
  assert not _is_slow(tree), f"{name} is the fast tier's core; make it faster, not slow"
