"""Running an absl command so that a usage error reads as one line, not a help page.

absl's ``app.run`` answers ``app.UsageError`` with the module's docstring and every flag (45-137
lines here) before the one line that says what is wrong. ``run`` prints that line alone on
stderr, ``Error: ...``, and exits with the error's status (1); ``--help`` still lists the flags.
"""

import functools
import sys

from absl import app


def one_line_usage_errors(main):
  """``main`` with an ``app.UsageError`` printed as one line and turned into its exit status."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      sys.stdout.flush()
      print(f"Error: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exitcode)

  return wrapped


def run(main) -> None:
  """``app.run(main)``, a usage error as one line (``one_line_usage_errors``)."""
  app.run(one_line_usage_errors(main))
