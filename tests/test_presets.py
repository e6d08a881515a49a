"""Per-task presets: chosen by the task, overridden by flags, the recipes the docs record."""

import dataclasses
import json
import shlex

import pytest

import learned_opt
from train import config as config_lib
from train import presets, saved_config


def _config(settings, tmp_path):
  return config_lib.MetaTrainConfig(**{"output_dir": str(tmp_path), **settings})


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_is_a_valid_config_for_its_own_task(name, tmp_path):
  config = _config(presets.select(None, name), tmp_path)
  assert config.task == name
  learned_opt.build(config.optimizer_config())


def test_the_task_picks_its_preset_and_given_flags_win(tmp_path):
  settings = presets.resolve(presets.select(None, "mnist_mlp"), {"num_problems": 4, "seed": 3})
  config = _config(settings, tmp_path)
  assert (config.num_problems, config.seed) == (4, 3)  # given
  assert (config.meta_objective, config.meta_lr_schedule, config.steps_per_epoch) == (
    "ramp",
    "cosine",
    80,
  )  # the preset's
  assert config.checkpoint_every == 100  # neither: the config's default


def test_the_quadratic_preset_is_todays_defaults_and_none_turns_presets_off(tmp_path):
  defaults = config_lib.MetaTrainConfig(output_dir=str(tmp_path))
  assert _config(presets.select(None, "quadratic"), tmp_path) == defaults
  assert _config(presets.select("none", "mnist_mlp"), tmp_path) == defaults
  assert presets.select(None, "a_task_without_preset") == {}


def test_the_mnist_preset_is_the_shipped_optimizers_recorded_recipe(tmp_path):
  """The preset trains what ``learned_opt.pretrained("mnist_mlp")`` was trained with."""
  command = shlex.split(learned_opt.shipped.metadata("mnist_mlp")["command"])
  flags = dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--"))
  for name in ("seed", *saved_config.NOT_AFFECTING_RESULTS):  # the run's, not the recipe's
    flags.pop(name, None)
  optimizer_kwargs = json.loads(flags.pop("optimizer_kwargs"))
  preset = _config(presets.select(None, "mnist_mlp"), tmp_path)
  for name, value in flags.items():
    assert getattr(preset, name) == type(getattr(preset, name))(value), name
  assert optimizer_kwargs == preset.optimizer_kwargs
  assert learned_opt.build(preset.optimizer_config()).config == (
    learned_opt.load("learned_opt/pretrained/mnist_mlp").optimizer.config
  )


def test_the_cifar10_preset_is_the_shipped_optimizers_recorded_config(tmp_path):
  """The preset trains what ``learned_opt.pretrained("cifar10_conv")`` was trained with."""
  recorded = saved_config.upgrade(learned_opt.shipped.metadata("cifar10_conv")["run_config"])
  preset = dataclasses.asdict(_config(presets.select(None, "cifar10_conv"), tmp_path))
  for name in saved_config.NOT_AFFECTING_RESULTS:  # output_dir, log_every, checkpoint_every, ...
    recorded.pop(name, None), preset.pop(name)
  assert preset == recorded


def test_the_neural_art_preset_is_the_shipped_optimizers_recorded_config(tmp_path):
  """The preset trains what ``learned_opt.pretrained("neural_art")`` was trained with."""
  recorded = saved_config.upgrade(learned_opt.shipped.metadata("neural_art")["run_config"])
  preset = dataclasses.asdict(_config(presets.select(None, "neural_art"), tmp_path))
  for name in saved_config.NOT_AFFECTING_RESULTS:  # output_dir, log_every, checkpoint_every, ...
    recorded.pop(name, None), preset.pop(name)
  assert preset == recorded


def test_presets_are_the_shipped_files_one_per_task():
  """Every task of the paper has a preset, a JSON file of config fields shipped as package data."""
  import importlib.resources

  from tasks import registry as task_registry

  paper = {"quadratic", "mnist_mlp", "cifar10_conv", "neural_art"}
  assert paper <= set(presets.names()) <= set(task_registry.names())
  for name in presets.names():
    text = importlib.resources.files("train").joinpath("configs", f"{name}.json").read_text()
    settings = json.loads(text)
    assert presets.DESCRIPTIONS[name] == settings.pop("description")
    assert settings == presets.select(None, name) == presets.load_file(_path(name))


def test_setup_cfg_ships_the_preset_files():
  import configparser
  import fnmatch
  import os

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = configparser.ConfigParser()
  parser.read(os.path.join(root, "setup.cfg"))
  patterns = [p.strip() for p in parser["options.package_data"]["train"].split(",")]
  for name in presets.names():
    assert any(fnmatch.fnmatch(f"configs/{name}.json", p) for p in patterns), name


def _path(name):
  import os

  return os.path.join(os.path.dirname(presets.__file__), "configs", f"{name}.json")


def test_a_json_file_is_a_preset_on_top_of_its_tasks(tmp_path):
  path = tmp_path / "small.json"
  path.write_text(json.dumps({"task": "mnist_mlp", "num_epochs": 2}))
  config = _config(presets.resolve(presets.select(str(path), "quadratic"), {}), tmp_path)
  assert (config.task, config.num_epochs, config.num_problems) == ("mnist_mlp", 2, 2)
  # A run's config.json reproduces that run (its output_dir replaced by the flag).
  saved = tmp_path / "run" / "config.json"
  saved.parent.mkdir()
  saved.write_text(_config({"task": "quadratic", "unroll": 10}, tmp_path / "run").to_json())
  settings = presets.resolve(presets.select(str(saved), "quadratic"), {"output_dir": "new"})
  assert config_lib.MetaTrainConfig(**settings).unroll == 10
  assert settings["output_dir"] == "new"


@pytest.mark.parametrize(
  "preset, content, message",
  [
    ("mnist", None, r"--preset='mnist' is neither a preset \(cifar10_conv, mixture, mnist_mlp"),
    ("typo.json", {"num_problem": 2}, r"num_problem is not a setting of meta-training"),
    ("list.json", [1], r"must hold a JSON object"),
    ("broken.json", "{", r"is not valid JSON"),
    ("missing.json", None, r"cannot read it"),
  ],
)
def test_a_bad_preset_is_named(preset, content, message, tmp_path):
  path = tmp_path / preset
  if content is not None:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
  name = str(path) if preset.endswith(".json") else preset
  with pytest.raises(ValueError, match=message):
    presets.select(name, "quadratic")


def _flags(argv):
  """The command's flags, parsed from ``argv``, on flag values of their own."""
  from absl import flags

  from train import meta_train

  flag_values = flags.FlagValues()
  meta_train.COMMAND.define_flags(flag_values)
  flag_values(["meta_train", *argv])
  return flag_values


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--task=mnist_mlp"], {"num_problems": 2, "meta_objective": "ramp", "unroll": 50}),
    (["--task=mnist_mlp", "--num_problems=3"], {"num_problems": 3, "meta_objective": "ramp"}),
    (["--task=mnist_mlp", "--preset=none"], {"num_problems": 128, "meta_objective": "sum"}),
    (["--preset=mnist_mlp", "--task=quadratic"], {"task": "quadratic", "num_problems": 2}),
    (["--task=neural_art"], {"num_problems": 4, "unroll": 32, "task_kwargs": {"size": 64}}),
    ([], {"task": "quadratic", "num_problems": 128}),
  ],
)
def test_the_command_line_resolves_presets_under_the_flags_given(argv, expected, tmp_path):
  from train import meta_train

  config = meta_train.config_from_flags(_flags([f"--output_dir={tmp_path}", *argv]))
  assert {name: getattr(config, name) for name in expected} == expected
  assert config.output_dir == str(tmp_path)


def test_help_lists_tasks_their_settings_presets_and_data_variables():
  from absl import flags

  from train import command_line, meta_train

  flag_values = flags.FlagValues()
  names = meta_train.COMMAND.define_flags(flag_values)
  sections = meta_train.COMMAND.help_sections()
  text = command_line.help_text(meta_train.__doc__, flag_values, names, sections)
  text = " ".join(text.split())  # lines are wrapped
  for expected in (
    "--output_dir: Required.",
    'mnist_mlp: hidden_sizes=[20], activation="sigmoid"',
    "quadratic: dim=10.",
    "$MNIST_DIR",
    "$CIFAR10_DIR",
    "mnist_mlp: --task=mnist_mlp --optimizer=lstm",
    "--num_problems: Problems per meta-step (vmapped). Presets: cifar10_conv 2, mixture 4, "
    "mnist_mlp 2, neural_art 4.",
    "neural_art: Section 3.4",
    "Shipped optimizers (--init_from=pretrained:NAME): cifar10_conv, mixture_mlp, mnist_mlp, "
    "neural_art, quadratic.",
  ):
    assert expected in text, expected
  assert "('" not in text  # choices are words, not Python tuples


def test_a_run_started_before_presets_resumes_with_its_saved_config_as_preset(tmp_path):
  """The same command now takes the mnist_mlp preset; the refusal says how to resume."""
  old = config_lib.MetaTrainConfig(output_dir=str(tmp_path), task="mnist_mlp", num_problems=2)
  (tmp_path / "config.json").write_text(old.to_json())
  now = _config(presets.resolve(presets.select(None, "mnist_mlp"), {"num_problems": 2}), tmp_path)
  assert saved_config.differences(json.loads(old.to_json()), now)  # e.g. --meta_objective
  hint = saved_config.resume_hint(now)
  assert f"add --preset={tmp_path}/config.json" in hint
  flag = hint.split("add --preset=")[1].split()[0]
  resumed = _config(presets.resolve(presets.select(flag, "mnist_mlp"), {"num_problems": 2}), "x")
  assert saved_config.differences(json.loads(old.to_json()), resumed) == []
  assert saved_config.resume_hint(old) == ""  # nothing to say when the settings agree
