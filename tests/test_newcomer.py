"""A newcomer's pass over every command line, as a user runs them in a shell.

Every usage error here is one line (``Error: ...``, at most one hint line after it), a non-zero
exit status, no traceback and no help page, and leaves nothing behind: no output folder, no
``config.json``, nothing beside the files the case started with. The cases: the four that used to
print tracebacks (``--init_from`` naming a missing folder; no VGG16 weights, in every command that
builds a neural-art task; neural art without CIFAR-10; an unknown ``--baselines`` name, in
evaluate, the suite and the experiments), and each command run with no arguments at all. Then
every command's ``--help`` and every console script's (``setup.cfg``) exits 0 and lists each of
its own flags.

The narrower cases of ``tests/test_command_line.py`` and ``tests/test_eval_cli.py`` (bad flag
values, output folders in the way, bad checkpoints) run there with the same checks
(``cli_checks``). The commands run two at a time: the pass takes ~40 s on 2 cores.
"""

import concurrent.futures
import configparser
import dataclasses
import importlib
import json
import os
import shutil

import pytest
from cli_checks import ROOT, assert_help, assert_one_line_error, run
from test_neural_art import TINY, tiny_weights

from tasks import vgg16

pytestmark = pytest.mark.slow  # ~40 child processes

COMMANDS = (
  "train.meta_train",
  "train.export",
  "train.sweep",
  "eval.evaluate",
  "eval.rank",
  "eval.suite",
  "eval.visualize",
  "experiments.mnist_experiments",
  "experiments.cifar10_experiments",
  "experiments.neural_art",
  "experiments.quadratic_variants",
)

D = "@D@"  # each case's own folder
NO_WEIGHTS = {"VGG16_WEIGHTS": f"{D}/missing.h5"}
NO_WEIGHTS_SAYS = f"VGG16 weights file '{D}/missing.h5' does not exist"
# Neural art on a tiny VGG-shaped network whose weights exist, so CIFAR-10 is what is missing.
TINY_ART = json.dumps({"vgg_weights": f"{D}/tiny.npz", "size": 8, **TINY})
NO_CIFAR = {"CIFAR10_DIR": f"{D}/cifar10"}
NO_CIFAR_SAYS = f"CIFAR-10 content images: CIFAR-10 directory '{D}/cifar10' holds none"
OUT = f"--output_dir={D}/out"

# (case, argv, environment, what the one line says)
ERRORS = [
  # --init_from naming a missing folder: used to leave config.json behind.
  ("init_from_missing", ["train.meta_train", OUT, f"--init_from={D}/no"], {},
   f"--init_from='{D}/no' names no usable saved optimizer"),
  # No VGG16 weights: every command that builds a neural-art task.
  ("vgg16_meta_train", ["train.meta_train", "--task=neural_art", OUT], NO_WEIGHTS,
   NO_WEIGHTS_SAYS),
  ("vgg16_evaluate", ["eval.evaluate", "--checkpoint=pretrained:neural_art", OUT], NO_WEIGHTS,
   NO_WEIGHTS_SAYS),
  ("vgg16_rank", ["eval.rank", "--checkpoint=pretrained:neural_art", OUT], NO_WEIGHTS,
   NO_WEIGHTS_SAYS),
  ("vgg16_visualize", ["eval.visualize", "--checkpoint=pretrained:neural_art", OUT], NO_WEIGHTS,
   NO_WEIGHTS_SAYS),
  ("vgg16_art_evaluate",
   ["experiments.neural_art", "evaluate", "--checkpoint=pretrained:neural_art", OUT], NO_WEIGHTS,
   NO_WEIGHTS_SAYS),
  ("vgg16_art_figures",
   ["experiments.neural_art", "figures", "--checkpoint=pretrained:neural_art", OUT], NO_WEIGHTS,
   NO_WEIGHTS_SAYS),
  # Neural art without CIFAR-10 (an empty $CIFAR10_DIR).
  ("cifar10_meta_train",
   ["train.meta_train", "--task=neural_art", f"--task_kwargs={TINY_ART}", OUT], NO_CIFAR,
   NO_CIFAR_SAYS),
  ("cifar10_evaluate", ["eval.evaluate", "--task=neural_art", f"--task_kwargs={TINY_ART}", OUT],
   NO_CIFAR, NO_CIFAR_SAYS),
  ("cifar10_art_evaluate",
   ["experiments.neural_art", "evaluate", "--baselines_only", f"--task_kwargs={TINY_ART}", OUT],
   NO_CIFAR, NO_CIFAR_SAYS),
  # An unknown --baselines name: evaluate's, the suite's, the experiments' (one check in
  # experiments.ExperimentConfig, after neural art's own checks).
  ("baselines_evaluate",
   ["eval.evaluate", "--checkpoint=pretrained:quadratic", "--baselines=sgd,lbfgs", OUT], {},
   "--baselines: unknown 'lbfgs'; choose from sgd,"),
  ("baselines_suite",
   ["eval.suite", "--optimizer=pretrained:quadratic", "--baselines=lbfgs", OUT], {},
   "Unknown --baselines ['lbfgs']; choose from ['sgd',"),
  ("baselines_mnist", ["experiments.mnist_experiments", "--baselines=lbfgs", OUT], {},
   "Unknown --baselines ['lbfgs']; choose from ['sgd',"),
  ("baselines_art",
   ["experiments.neural_art", "evaluate", "--checkpoint=pretrained:neural_art",
    "--baselines=lbfgs", OUT], {}, "Unknown --baselines ['lbfgs']; choose from ['sgd',"),
  # What a newcomer types first: the command alone.
  ("bare_meta_train", ["train.meta_train"], {}, "--output_dir is required"),
  ("bare_export", ["train.export"], {}, "--run_dir is required"),
  ("bare_sweep", ["train.sweep"], {}, "--output_dir is required"),
  ("bare_evaluate", ["eval.evaluate"], {}, "--output_dir is required"),
  ("bare_rank", ["eval.rank"], {}, "Name what to rank: --run=DIR"),
  ("bare_suite", ["eval.suite"], {}, "--output_dir is required"),
  ("bare_visualize", ["eval.visualize"], {}, "--checkpoint is required"),
  ("bare_mnist", ["experiments.mnist_experiments"], {}, "--output_dir is required"),
  ("bare_cifar10", ["experiments.cifar10_experiments"], {}, "--output_dir is required"),
  ("bare_art", ["experiments.neural_art"], {}, "give one stage word first (see --help)"),
  ("bare_quadratic_variants", ["experiments.quadratic_variants"], {}, "--output_dir is required"),
]  # fmt: skip


def console_scripts() -> dict[str, str]:
  """``setup.cfg``'s console scripts: ``{script: module}``."""
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
  entries = dict(line.split("=") for line in lines)
  return {name.strip(): target.split(":")[0].strip() for name, target in entries.items()}


def own_flags(module: str) -> list[str]:
  """``--NAME`` of every field of the command's config (its positional word excepted)."""
  command = importlib.import_module(module).COMMAND
  fields = dataclasses.fields(command.config_class)
  return [f"--{f.name}" for f in fields if f.name != command.positional]


def _files(directory) -> set[str]:
  return {
    os.path.relpath(os.path.join(folder, name), directory)
    for folder, dirs, files in os.walk(directory)
    for name in dirs + files
  }


def _error_case(root, case, argv, env):
  """Runs one error case in its own folder; returns (result, files before, files after)."""
  d = os.path.join(root, case)
  os.makedirs(os.path.join(d, "cifar10"))
  vgg16.save_npz(os.path.join(d, "tiny.npz"), tiny_weights())
  before = _files(d)
  argv = [a.replace(D, d) for a in argv]
  result = run(argv, env={k: v.replace(D, d) for k, v in env.items()})
  return result, before, _files(d)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every case's child process, started two at a time as the module begins; each test waits
  for its own."""
  root = str(tmp_path_factory.mktemp("newcomer"))
  away = str(tmp_path_factory.mktemp("elsewhere"))  # console scripts run away from the source
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  futures = {}
  for case, argv, env, _ in ERRORS:
    futures[case] = pool.submit(_error_case, root, case, argv, env)
  for module in COMMANDS:
    futures[module] = pool.submit(run, [module, "--help"])
  for script in console_scripts():
    path = shutil.which(script)
    if path is not None:
      futures[script] = pool.submit(run, [path, "--help"], cwd=away)
  yield {"root": root, "futures": futures}
  pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case, argv, env, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_usage_errors_are_one_line_and_leave_nothing(results, case, argv, env, message):
  result, before, after = results["futures"][case].result()
  d = os.path.join(results["root"], case)
  assert_one_line_error(result, message.replace(D, d))
  assert after == before, sorted(after - before)  # no output folder, no config.json


@pytest.mark.parametrize("module", COMMANDS)
def test_every_commands_help_lists_its_own_flags(results, module):
  assert_help(results["futures"][module].result(), own_flags(module))


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_every_console_scripts_help_lists_its_commands_flags(results, script):
  if script not in results["futures"]:
    pytest.skip(f"{script} is not installed (pip install -e .)")
  assert_help(results["futures"][script].result(), own_flags(console_scripts()[script]))


def test_every_command_is_in_the_pass():
  """A new command (a module with a ``COMMAND``) joins the pass: its --help and a bare run."""
  found = set()
  for package in ("train", "eval", "experiments"):
    for name in os.listdir(os.path.join(ROOT, package)):
      path = os.path.join(ROOT, package, name)
      if name.endswith(".py") and "\nCOMMAND = " in open(path).read():
        found.add(f"{package}.{name[:-3]}")
  assert found == set(COMMANDS)
  assert set(console_scripts().values()) <= set(COMMANDS)
  bare = {argv[0] for case, argv, *_ in ERRORS if case.startswith("bare_")}
  assert bare == set(COMMANDS)
