"""What a user sees of a command run in a child process: the checks every command-line test shares.

A usage error is one line, ``Error: ...`` (and at most one hint line after it), a non-zero exit
status, no traceback and no help dump; ``--help`` exits 0 and lists the command's own flags.
Lines that are not the command's (JAX's and absl's start-up notes, the allocator's) are noise.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines a command does not write itself: absl/XLA C++ log lines (``I0000 00:00:...``), absl's
# note before its logging starts, the allocator the command line chose (train/allocator.py).
NOISE = re.compile(
  r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog|"
  r"Using \S+ as malloc)"
)


def run(argv, *, cwd=ROOT, env=None, timeout=180) -> subprocess.CompletedProcess:
  """``argv`` in a child process (``python -m MODULE`` when argv[0] is a module name)."""
  argv = [str(a) for a in argv]
  if not os.path.isabs(argv[0]):
    argv = [sys.executable, "-m", *argv]
  environ = {**os.environ, **(env or {})}
  return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ)


def said(result: subprocess.CompletedProcess) -> list[str]:
  """The command's own non-blank lines, stdout's then stderr's, without the noise."""
  lines = result.stdout.splitlines() + result.stderr.splitlines()
  return [line for line in lines if line.strip() and not NOISE.match(line)]


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, status: int = 1):
  """Exit ``status``; ``Error: ...`` holding ``message`` on stderr, at most one line after it
  (a hint), nothing else; no traceback, no help page, no TPU probe line."""
  shown = result.stdout + result.stderr
  assert result.returncode == status, shown[-3000:]
  assert "Traceback" not in shown and "--helpfull" not in shown and "Flags:" not in shown, shown
  assert "libtpu" not in shown, shown
  lines = said(result)
  assert 1 <= len(lines) <= 2, lines
  assert lines[0].startswith("Error: ") and message in lines[0], lines
  assert lines[0] in result.stderr.splitlines(), "the error goes to stderr"


def assert_help(result: subprocess.CompletedProcess, expected) -> None:
  """Exit 0, a ``Flags:`` section on stdout holding each of ``expected``, no traceback."""
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert "Traceback" not in result.stderr, result.stderr
  assert "\nFlags:\n" in result.stdout, result.stdout[:2000]
  for text in expected:
    assert text in result.stdout, text
