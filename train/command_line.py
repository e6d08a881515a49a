"""The one start of every command: config flags, ``--help``, one-line usage errors, devices.

``Command(main, Config, doc=__doc__).run()`` is a command's whole entry point. It defines one
flag per field of the frozen config dataclass ``Config`` (``train.config_flags``), answers
``--help`` with the command's own flags (exit 0, also through a console script), parses the flags
(absl's ``app.run``), starts ``jax.distributed`` and the mesh for a multi-device command,
builds and validates the config, checks the output directory, and calls ``main(config)``.

A usage error (a bad flag value, a config that does not validate, an output directory in the
way, an ``app.UsageError`` that ``main`` raises) is one line on stderr, ``Error: ...``, exit
status 1: no help page, no traceback, and nothing written (checks come before any file is).

Example:
  def main(config: VisualizeConfig) -> None:
    ...

  COMMAND = command_line.Command(main, VisualizeConfig, doc=__doc__, output=OutputDir())

  if __name__ == "__main__":
    COMMAND.run()
"""

import dataclasses
import functools
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from train import config_flags

UsageError = app.UsageError
HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")
ALLOW_NONEMPTY = "allow_nonempty_output_dir"


@dataclasses.dataclass(frozen=True)
class OutputDir:
  """The directory a command writes, and the files that show it is one of the command's own.

  A directory that exists, is not empty and holds none of ``marks`` belongs to something else
  (the user's files): it is refused unless ``--allow_nonempty_output_dir`` is given.
  """

  field: str = "output_dir"  # the config field naming the directory
  marks: tuple[str, ...] = ()  # names of files the command writes there
  what: str = "output of this command"  # for the refusal: "... holds files that are not a WHAT"


def _silence_tpu_probe() -> None:
  """Drops JAX's "Unable to initialize backend 'tpu'" line where no libtpu is installed.

  Only that probe's line, when ``libtpu.so`` itself cannot be found: a TPU runtime that is
  installed but fails still says so, as does every other backend.
  """

  def keep(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (
      message.startswith("Unable to initialize backend 'tpu'")
      and "libtpu.so: cannot open shared object file" in message
    )

  logger = logging.getLogger("jax._src.xla_bridge")
  if not any(getattr(f, "__name__", "") == keep.__name__ for f in logger.filters):
    logger.addFilter(keep)


def fail(message: str, status: int = 1) -> None:
  """Ends the process with ``Error: message`` on stderr (stdout flushed first)."""
  sys.stdout.flush()
  print(f"Error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def one_line_usage_errors(main):
  """``main`` with an ``app.UsageError`` printed as one line and turned into its exit status."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except app.UsageError as e:
      fail(str(e), e.exitcode)

  return wrapped


def check_output_dir(
  path: str, output: OutputDir, allow_nonempty: bool = False, flag: str = "--output_dir"
) -> None:
  """Raises ``ValueError`` if ``path`` cannot be the command's output directory; creates nothing.

  Refused: a file; a path under a file; an unwritable directory; a non-empty directory that
  holds none of ``output.marks`` (someone else's files), unless ``allow_nonempty``.
  """
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag}={path!r} exists and is not a directory; name a directory.")
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"{flag}={path!r}: {probe} is a file, not a directory; name a directory.")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}={path!r}: {probe} is not writable; name a writable directory.")
  if probe != os.path.abspath(path) or allow_nonempty:
    return
  from learned_opt import tree_files  # Deferred: only a run that starts checks this.

  names = sorted(os.listdir(path))  # a killed atomic write's temporaries are the command's too
  ours = [n for n in names if n in output.marks or n.startswith(tree_files.TMP_PREFIX)]
  if names and not ours:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise ValueError(
      f"{flag}={path!r} holds files that are not a {output.what} ({shown}); name a new or empty "
      f"directory, or pass --{ALLOW_NONEMPTY} to write beside them."
    )


def _print_help(text: str) -> None:
  """Prints ``--help`` and exits 0, also when a pager or ``head`` closes the pipe early."""
  try:
    sys.stdout.write(text)
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
  sys.exit(0)


def _help_requested(argv: Sequence[str]) -> str | None:
  for arg in argv[1:]:
    if arg == "--":
      return None
    if arg in HELP_FLAGS:
      return arg
  return None


def _render(flag_values: flags.FlagValues, names: Sequence[str]) -> list[str]:
  """absl's help lines for ``names``: ``--name: help`` wrapped, then its default."""
  lines = []
  for name in sorted(names):
    flag = flag_values[name]
    lines.append(_wrap(f"--{name}: {flag.help}", "  ", "    "))
    if flag.default not in (None, ""):  # required and optional settings show none
      lines.append(f"    (default: {flag.default_as_str})")
  return lines


def help_text(
  doc: str, flag_values: flags.FlagValues, names: Sequence[str], sections: Sequence[str] = ()
) -> str:
  """The command's ``--help``: its docstring, its own flags, then ``sections`` (tasks, ...).

  A section's first line is its heading; each further line is one wrapped, indented entry.
  """
  parts = [textwrap.dedent(doc or "").strip(), "", "Flags:", *_render(flag_values, names)]
  for section in sections:
    heading, *entries = section.split("\n")
    parts += ["", _wrap(heading, "", "  ")]
    parts += [_wrap(entry, "  ", "    ") for entry in entries]
  parts += ["", "JAX's flags (--jax_*) and absl's (logging, ...): --helpfull."]
  return "\n".join(parts) + "\n"


def _wrap(text: str, first: str, rest: str) -> str:
  return textwrap.fill(
    text, width=100, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
  )


def tasks_section() -> str:
  """``--help``'s line of task families (``tasks.registry``)."""
  from tasks import registry as task_registry  # Deferred: only --help lists them.

  return f"Tasks (--task): {', '.join(task_registry.names())}."


def shipped_section(flag: str) -> str:
  """``--help``'s line of the optimizers shipped with the package, as ``flag`` takes them."""
  import learned_opt  # Deferred: only --help lists them.

  names = ", ".join(learned_opt.pretrained_names())
  return f"Shipped optimizers (--{flag}=pretrained:NAME): {names}."


@dataclasses.dataclass(frozen=True)
class Command:
  """A command line: its config, its help, and how it starts (``run``).

  Attributes:
    main: the command; it receives the validated config. It may raise ``app.UsageError`` for a
      problem found later (no data, a checkpoint that does not fit), printed as one line.
    config_class: a frozen dataclass; each field is a flag (``config_flags.setting``), and its
      ``__post_init__`` raises a ``ValueError`` naming the flag for a bad value.
    doc: the command's description (its module docstring), the head of ``--help``.
    config_from_flags: ``flag_values -> config`` where the config is more than the flags given
      (meta-training's presets); default: ``config_flags.from_flags``. Not with ``positional``.
    help_note: ``field name -> text`` added to the field's help.
    help_sections: the paragraphs ``--help`` ends with (tasks, presets, shipped optimizers).
    more_flags: defines the command's flags that are not config fields (``--preset``).
    distributed: a command whose work spreads over devices and processes: ``jax.distributed``
      starts before anything else (``--coordinator_address``, ...) and ``main`` runs inside
      ``distributed.use_mesh`` of the ``--num_devices`` mesh (``distributed.current_mesh()``).
    output: the output directory to check before ``main`` (``check_output_dir``); adds
      ``--allow_nonempty_output_dir``.
    positional: the config field that takes the command line's one positional word, for a
      command with stages (``python -m experiments.neural_art evaluate --flags``); its
      ``__post_init__`` checks the word. None: positional words are refused.
  """

  main: Callable[[Any], Any]
  config_class: type
  doc: str = ""
  config_from_flags: Callable[[flags.FlagValues], Any] | None = None
  help_note: Callable[[str], str] | None = None
  help_sections: Callable[[], Sequence[str]] | None = None
  more_flags: Callable[[flags.FlagValues], None] | None = None
  distributed: bool = False
  output: OutputDir | None = None
  positional: str | None = None

  def define_flags(self, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Defines the command's flags; returns their names (what its ``--help`` lists)."""
    before = set(flag_values)
    config_flags.define(self.config_class, flag_values, self.help_note)
    if self.positional:  # given as a word, not a flag
      flag_values.remove_flag_values([self.positional])
      before.add(self.positional)
    if self.more_flags:
      self.more_flags(flag_values)
    if self.distributed:
      from train import distributed  # Deferred: it imports jax, which --help does not need.

      distributed.define_flags(flag_values)
    if self.output is not None and ALLOW_NONEMPTY not in flag_values:
      flags.DEFINE_bool(
        ALLOW_NONEMPTY,
        False,
        f"Write into a --{self.output.field} that already holds other files (they are left as "
        "they are). Default: such a directory is refused, so nothing of yours is mixed with or "
        "replaced by this command's output.",
        flag_values=flag_values,
      )
    return sorted(set(flag_values) - before)

  def config(self, flag_values: flags.FlagValues = flags.FLAGS, words: Sequence[str] = ()):
    """The validated config of parsed ``flag_values`` (and the positional ``words``).

    Raises:
      ValueError: naming a bad flag, or an unexpected positional word.
    """
    if self.positional is None and words:
      raise ValueError(
        f"unexpected arguments {list(words)}: every setting is a flag, e.g. --name=value (see "
        "--help)."
      )
    if self.positional is not None and len(words) != 1:
      raise ValueError(f"give one {self.positional} word first (see --help), got {list(words)}.")
    if self.config_from_flags:
      return self.config_from_flags(flag_values)
    word = {self.positional: words[0]} if self.positional else {}
    return config_flags.from_flags(self.config_class, flag_values, word)

  def run(self, argv: Sequence[str] | None = None) -> None:
    """Runs the command on ``argv`` (default ``sys.argv``); exits the process."""
    argv = list(sys.argv if argv is None else argv)
    _silence_tpu_probe()
    names = self.define_flags()
    asked = _help_requested(argv)
    if asked == "--helpfull":
      _print_help(flags.FLAGS.get_help() + "\n")
    if asked:
      sections = self.help_sections() if self.help_sections else ()
      _print_help(help_text(self.doc, flags.FLAGS, names, sections))
    import jax  # Deferred: --help needs no JAX.

    jax.config.parse_flags_with_absl()
    app.run(one_line_usage_errors(self._start), argv=argv, flags_parser=_parse_flags)

  def _start(self, argv: list[str]):
    """What ``app.run`` calls once the flags are parsed."""
    from train import distributed  # Deferred: it imports jax.

    if self.distributed:
      try:
        distributed.initialize_from_flags()  # before any JAX computation
      except ValueError as e:
        raise UsageError(str(e)) from e
    try:
      config = self.config(flags.FLAGS, argv[1:])
      if self.output is not None:
        path, allow = getattr(config, self.output.field), flags.FLAGS[ALLOW_NONEMPTY].value
        check_output_dir(path, self.output, allow, f"--{self.output.field}")
      mesh = distributed.mesh_from_flags() if self.distributed else None
    except ValueError as e:
      raise UsageError(str(e)) from e
    if mesh is None:
      return self.main(config)
    with distributed.use_mesh(mesh):
      return self.main(config)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a malformed flag (``--unroll=abc``, a typo) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (--help lists the flags)")
