"""Sphinx configuration of the API reference (``docs/api``), built from the docstrings.

Build it as CI does (warnings are errors):
  pip install -e ".[docs]"
  python3 -m sphinx -W --keep-going -b html docs/api /tmp/learned_opt_api
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)  # the packages, also from a source tree that is not installed
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

project = "learned-opt"
author = "learned-opt authors"
copyright = "the learned-opt authors, Apache-2.0"

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",  # the Google-style docstrings (Args:, Returns:, Raises:)
  "sphinx.ext.viewcode",
  "command_help",  # each command's --help, generated at build time (_ext/command_help.py)
]

autodoc_default_options = {"member-order": "bysource"}  # members: listed on each page
autodoc_typehints = "none"  # the docstrings say what each argument is; pytree unions expand badly
autodoc_preserve_defaults = True  # defaults as written (BASELINES, not a dict's repr)
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_attr_annotations = False  # types are in the prose; pytree unions expand badly
napoleon_use_ivar = True  # "Attributes:" as fields, not entries that clash with autodoc's own

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Learned optimizers in JAX", "fixed_sidebar": True}


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """A NamedTuple's fields are described by its docstring; drop the "Alias for field" stubs."""
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return None


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
