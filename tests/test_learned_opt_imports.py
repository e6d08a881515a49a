"""learned_opt's modules import each other without a cycle (deferred imports included), and the
package imports nothing of tasks/, train/ or eval/ (DESIGN.md: data flows one way)."""

import ast
import pathlib

PACKAGE = "learned_opt"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE


def module_graph(root: pathlib.Path, package: str) -> tuple[dict[str, set[str]], set[str]]:
  """(module -> package modules it imports anywhere in its source, every top-level name imported).

  Subpackages count module by module (``learned_opt.kernels.stack``), not as the package.

  ``from learned_opt import serialization`` is an edge to that module; ``from learned_opt import
  build`` (a name, not a module) is an edge to the package's ``__init__``.
  """

  def name_of(path: pathlib.Path) -> str:  # learned_opt/kernels/stack.py -> dotted name
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))

  modules = {name_of(p): p for p in root.rglob("*.py")}
  graph, top_level = {}, set()
  for name, path in modules.items():
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets += [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: ``from .base import x`` or ``from . import base``
          base = ".".join([package] + ([base] if base else []))
        targets += [f"{base}.{alias.name}" for alias in node.names]
    edges = set()
    for target in targets:
      top_level.add(target.split(".")[0])
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != name:
        edges.add(target)
    graph[name] = edges
  return graph, top_level


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """A cycle as a path ``[a, b, ..., a]``, or ``[]`` if the graph has none."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return []

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return []


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_learned_opt_has_no_import_cycle():
  graph, _ = module_graph(ROOT, PACKAGE)
  assert "learned_opt.kernels.stack" in graph["learned_opt.lstm_rows"]  # subpackages seen
  # The registry rebuilds partitions, so it needs parameter_groups (and not the other way).
  assert "learned_opt.parameter_groups" in graph["learned_opt.registry"]
  assert find_cycle(graph) == []


def test_learned_opt_imports_no_driver_package():
  _, top_level = module_graph(ROOT, PACKAGE)
  assert PACKAGE in top_level and "jax" in top_level
  assert not top_level & {"tasks", "train", "eval", "experiments"}


def test_the_kernels_import_nothing_above_them():
  """learned_opt/kernels/ is the package's lowest floor: its modules import one another and the
  file utilities (``tree_files``) only, never the optimizers that run on them."""
  graph, _ = module_graph(ROOT, PACKAGE)
  below = {"learned_opt.tree_files"}
  for name, edges in graph.items():
    if name.startswith("learned_opt.kernels"):
      assert all(e.startswith("learned_opt.kernels") or e in below for e in edges), (name, edges)
