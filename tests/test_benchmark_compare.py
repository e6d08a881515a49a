"""``benchmarks.compare``: the earlier commit's worktree measured by today's benchmark code, its
errors (these run git: slow tier), and the before / now ratios. (The timed runs themselves are by
hand: BUILD.md.)"""

import os
import shutil
import subprocess

import pytest

from benchmarks import compare

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(root, *args):
  return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True)


@pytest.fixture
def repository(tmp_path):
  """A git repository with two commits of the measuring code; HEAD's differs from the first's."""
  root = str(tmp_path / "repo")
  os.makedirs(os.path.join(root, "benchmarks"))
  git(root, "init", "-q")
  for version in ("old", "new"):
    for path in compare.MEASURING_CODE:
      with open(os.path.join(root, path), "w") as f:
        f.write(f"# {version} {path}\n")
    with open(os.path.join(root, "library.py"), "w") as f:
      f.write(f"VERSION = {version!r}\n")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", version)
  return root


@pytest.mark.slow
@needs_git
def test_checkout_holds_the_old_library_and_todays_benchmark_code(repository, tmp_path):
  tree = str(tmp_path / "before")
  compare.checkout("HEAD~1", tree, root=repository)
  with open(os.path.join(tree, "library.py")) as f:
    assert f.read() == "VERSION = 'old'\n"
  for path in compare.MEASURING_CODE:
    with open(os.path.join(tree, path)) as f:
      assert f.read() == f"# new {path}\n"
  compare.remove(tree, root=repository)
  assert not os.path.exists(tree)
  assert str(tmp_path / "before") not in git(repository, "worktree", "list").stdout


@pytest.mark.slow
@needs_git
def test_an_unknown_revision_is_named(repository, tmp_path):
  with pytest.raises(ValueError, match="cannot check out 'no-such-commit'"):
    compare.checkout("no-such-commit", str(tmp_path / "before"), root=repository)


def test_ratios_are_before_over_now_per_round_with_medians():
  pairs = [
    ({"seconds": 4.0, "cpu_seconds": 8.0}, {"seconds": 2.0, "cpu_seconds": 5.0}),
    ({"seconds": 3.0, "cpu_seconds": 6.0}, {"seconds": 2.0, "cpu_seconds": 2.0}),
    ({"seconds": 5.0, "cpu_seconds": 9.0}, {"seconds": 2.0, "cpu_seconds": 4.5}),
  ]
  summary = compare.ratios(pairs)
  assert summary["wall"] == [2.0, 1.5, 2.5] and summary["cpu"] == [1.6, 3.0, 2.0]
  assert summary["median_wall"] == 2.0 and summary["median_cpu"] == 2.0
