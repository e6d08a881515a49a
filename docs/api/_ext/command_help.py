"""A Sphinx directive that prints a command's ``--help`` as the command itself would.

  .. command-help:: eval.evaluate

imports the module, defines its ``COMMAND``'s flags on a fresh ``absl.flags.FlagValues`` and
renders ``train.command_line.help_text``: the text ``python -m eval.evaluate --help`` prints,
without starting a process, so the page cannot drift from the command.
"""

import importlib

from absl import flags
from docutils import nodes
from docutils.parsers.rst import Directive


def help_of(module_name: str) -> str:
  """``python -m MODULE --help``'s text, rendered in this process."""
  from train import command_line

  command = importlib.import_module(module_name).COMMAND
  flag_values = flags.FlagValues()
  names = command.define_flags(flag_values)
  sections = command.help_sections() if command.help_sections else ()
  return command_line.help_text(command.doc, flag_values, names, sections)


class CommandHelp(Directive):
  required_arguments = 1

  def run(self):
    text = help_of(self.arguments[0])
    block = nodes.literal_block(text, text)
    block["language"] = "text"
    return [block]


def setup(app):
  app.add_directive("command-help", CommandHelp)
  return {"version": "1", "parallel_read_safe": True}
