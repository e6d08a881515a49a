"""One configuration pattern for every command: config fields as flags, --help, usage errors."""

import dataclasses
import logging
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags
from cli_checks import assert_help, assert_one_line_error

from train import command_line, config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """A config of every kind of field a command has."""

  output_dir: str = config_flags.setting("", "Required. Where it goes.")
  steps: int = config_flags.setting(100, "Optimization steps.")
  lr: float = config_flags.setting(0.1, "Learning rate.")
  verbose: bool = config_flags.setting(False, "Say more.")
  task: str | None = config_flags.setting(None, "Task; default: the checkpoint's.")
  step: int | None = config_flags.setting(None, "Meta-step; default: the newest.")
  task_kwargs: dict = config_flags.setting({}, "JSON settings of the task.")
  baselines: tuple[str, ...] = config_flags.setting(["adam", "sgd"], "Baselines to compare.")
  checkpoint: tuple[str, ...] = config_flags.setting((), "Saved optimizers.", repeat=True)
  extra: dict | None = config_flags.setting(None, "JSON settings; default: the checkpoint's.")

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.steps > 0:
      raise ValueError(f"--steps must be positive, got {self.steps}.")


def test_every_field_is_a_flag_with_its_help_and_default():
  flag_values = flags.FlagValues()
  names = config_flags.define(ToyConfig, flag_values)
  assert names == [f.name for f in dataclasses.fields(ToyConfig)]
  for field in dataclasses.fields(ToyConfig):
    assert flag_values[field.name].help.startswith(field.metadata["help"])
  flag_values(["prog"])
  assert config_flags.from_flags(ToyConfig, flag_values) == ToyConfig()


def test_flags_round_trip_into_the_config():
  config = config_flags.parse(
    ToyConfig,
    [
      "prog",
      "--steps=5",
      "--lr=0.5",
      "--verbose",
      "--task=mnist_mlp",
      "--step=8",
      '--task_kwargs={"dim": 3, "nested": {"a": [1, 2]}}',
      "--baselines=adam,rmsprop",
      "--checkpoint=a=runs/a",
      "--checkpoint=pretrained:quadratic",
      '--extra={"split": "valid"}',
    ],
  )
  assert config == ToyConfig(
    steps=5,
    lr=0.5,
    verbose=True,
    task="mnist_mlp",
    step=8,
    task_kwargs={"dim": 3, "nested": {"a": [1, 2]}},
    baselines=("adam", "rmsprop"),
    checkpoint=("a=runs/a", "pretrained:quadratic"),
    extra={"split": "valid"},
  )
  assert dataclasses.replace(config, steps=6).steps == 6  # frozen: changed by copy only
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.steps = 7


def test_defaults_under_the_flags_given():
  """A preset's settings fill what the flags leave unset."""
  config = config_flags.parse(ToyConfig, ["prog", "--lr=0.5"], defaults={"lr": 1.0, "steps": 7})
  assert (config.lr, config.steps) == (0.5, 7)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--task_kwargs={dim"], r"--task_kwargs is not valid JSON .*e.g. --task_kwargs='\{\"dim\""),
    (["--task_kwargs=[3]"], r"--task_kwargs must be a JSON object"),
    (["--steps=0"], r"--steps must be positive, got 0"),
  ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(argv, message):
  with pytest.raises(ValueError, match=message) as error:
    config_flags.parse(ToyConfig, ["prog", *argv])
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"steps": 2.0}, r"--steps must be int, got 2.0"),
    ({"steps": True}, r"--steps must be int, got True"),
    ({"lr": float("nan")}, r"--lr must be a finite number, got nan"),
    ({"task_kwargs": [1]}, r"--task_kwargs must be a JSON object"),
    ({"baselines": "adam"}, r"--baselines must be a list of names"),
    ({"step": "3"}, r"--step must be int, got '3'"),
  ],
)
def test_configs_built_by_hand_are_type_checked(overrides, message):
  with pytest.raises(ValueError, match=message):
    ToyConfig(**overrides)


def test_a_malformed_flag_is_a_flags_error():
  with pytest.raises(flags.Error, match="invalid literal"):
    config_flags.parse(ToyConfig, ["prog", "--steps=many"])


def test_help_lists_the_commands_own_flags_and_sections():
  command = command_line.Command(
    lambda config: None,
    ToyConfig,
    doc="Does a toy job.\n\nExample:\n  python -m toy --steps=5\n",
    help_sections=lambda: ["Tasks: quadratic, mnist_mlp.", "Presets:\nsmall: a small one."],
    output=command_line.OutputDir(),
  )
  flag_values = flags.FlagValues()
  names = command.define_flags(flag_values)
  assert set(names) == {f.name for f in dataclasses.fields(ToyConfig)} | {
    command_line.ALLOW_NONEMPTY
  }
  text = command_line.help_text(command.doc, flag_values, names, command.help_sections())
  assert text.startswith("Does a toy job.")
  for expected in (
    "  --steps: Optimization steps.\n    (default: '100')",
    "  --task_kwargs: JSON settings of the task.\n    (default: '{}')",
    "  --baselines: Baselines to compare.\n    (default: 'adam,sgd')",
    "  --output_dir: Required. Where it goes.\n",
    "Tasks: quadratic, mnist_mlp.",
    "Presets:\n  small: a small one.",
  ):
    assert expected in text, expected


@dataclasses.dataclass(frozen=True)
class StagedConfig:
  stage: str = config_flags.setting("", "train, evaluate or figures (the first word).")
  steps: int = config_flags.setting(100, "Optimization steps.")

  def __post_init__(self):
    if self.stage not in ("train", "evaluate", "figures"):
      raise ValueError(f"{self.stage!r} is no stage; give train, evaluate or figures first.")


def test_a_command_with_stages_takes_one_positional_word():
  command = command_line.Command(lambda config: None, StagedConfig, positional="stage")
  flag_values = flags.FlagValues()
  assert command.define_flags(flag_values) == ["steps"]  # the stage is a word, not a flag
  flag_values(["prog", "--steps=3"])
  assert command.config(flag_values, ["evaluate"]) == StagedConfig("evaluate", 3)
  with pytest.raises(ValueError, match=r"give one stage word first.*got \[\]"):
    command.config(flag_values, [])
  with pytest.raises(ValueError, match=r"'plot' is no stage"):
    command.config(flag_values, ["plot"])
  plain = command_line.Command(lambda config: None, ToyConfig)
  plain_flags = flags.FlagValues()
  plain.define_flags(plain_flags)
  plain_flags(["prog"])
  with pytest.raises(ValueError, match=r"unexpected arguments \['runs/x'\]: every setting is a"):
    plain.config(plain_flags, ["runs/x"])


def test_output_dir_checks(tmp_path):
  output = command_line.OutputDir("output_dir", ("config.json",), "toy run")
  command_line.check_output_dir(str(tmp_path / "new" / "deeper"), output)  # made later
  assert not (tmp_path / "new").exists()  # the check creates nothing
  command_line.check_output_dir(str(tmp_path), output)  # empty
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds files that are not a toy run \(notes.txt\).*"):
    command_line.check_output_dir(str(tmp_path), output)
  command_line.check_output_dir(str(tmp_path), output, allow_nonempty=True)
  (tmp_path / "config.json").write_text("{}")  # a run of the command: resumed, not refused
  command_line.check_output_dir(str(tmp_path), output)
  with pytest.raises(ValueError, match="exists and is not a directory"):
    command_line.check_output_dir(str(tmp_path / "notes.txt"), output)
  with pytest.raises(ValueError, match="is a file, not a directory"):
    command_line.check_output_dir(str(tmp_path / "notes.txt" / "out"), output)


def test_the_tpu_probe_line_is_dropped_and_other_backend_errors_kept(caplog):
  command_line._silence_tpu_probe()  # noqa: SLF001
  command_line._silence_tpu_probe()  # noqa: SLF001 (once is enough; twice adds nothing)
  logger = logging.getLogger("jax._src.xla_bridge")
  assert len(logger.filters) == 1
  with caplog.at_level(logging.INFO, logger="jax._src.xla_bridge"):
    logger.info(
      "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
      "cannot open shared object file: No such file or directory"
    )
    logger.info("Unable to initialize backend 'tpu': UNAVAILABLE: TPU in use by pid 7")
    logger.info("Unable to initialize backend 'cuda': no supported devices found")
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 2 and "TPU in use" in messages[0] and "'cuda'" in messages[1]


# ---- the commands, as a user runs them ---------------------------------------------------------


def _run(*argv, cwd=ROOT):
  return subprocess.run(
    list(argv), cwd=cwd, capture_output=True, text=True, timeout=180, env=os.environ.copy()
  )


COMMANDS = {
  "train.meta_train": ("--task_kwargs", "--preset", "--num_devices", "neural_art: Section"),
  "train.export": ("--run_dir", "--output", "--step", "--overwrite", "--metadata"),
  "eval.visualize": ("--checkpoint", "--output_dir", "--coordinate", "Shipped optimizers"),
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_exits_0_and_lists_the_flags(module):
  assert_help(_run(sys.executable, "-m", module, "--help"), COMMANDS[module])


@pytest.mark.slow
@pytest.mark.parametrize(
  "script, expected",
  [
    ("learned-opt-train", "--task_kwargs"),
    ("learned-opt-export", "--run_dir"),
    ("learned-opt-eval", "--num_problems"),
  ],
)
def test_console_scripts_help_lists_the_flags(script, expected, tmp_path):
  path = shutil.which(script)
  if path is None:
    pytest.skip(f"{script} is not installed (pip install -e .)")
  assert_help(_run(path, "--help", cwd=tmp_path), [expected])  # away from the source tree


@pytest.mark.slow
@pytest.mark.parametrize(
  "module, argv, message",
  [
    ("train.meta_train", ["--unroll=abc"], "flag --unroll=abc: invalid literal"),
    ("train.meta_train", ["--unrol=3"], "Unknown command line flag 'unrol'"),
    ("train.meta_train", ["runs/x"], "unexpected arguments ['runs/x']"),
    ("train.meta_train", ["--output_dir={out}", "--meta_lr=-1"], "--meta_lr must be positive"),
    ("train.meta_train", ["--output_dir={out}", "--preset=mnist"], "--preset='mnist' is neither"),
    ("train.export", ["--output={out}"], "--run_dir is required"),
    ("train.export", ["--run_dir={tmp}", "--output={out}", "--metadata=[1]"], "must be a JSON"),
    ("eval.visualize", ["--output_dir={out}"], "--checkpoint is required"),
    ("eval.visualize", ["--checkpoint=pretrained:quadratic", "--num_steps=0"], "--num_steps must"),
  ],
)
def test_usage_errors_are_one_line_and_leave_nothing(module, argv, message, tmp_path):
  argv = [a.format(out=tmp_path / "out", tmp=tmp_path) for a in argv]
  if module == "eval.visualize" and not any(a.startswith("--output_dir") for a in argv):
    argv.append(f"--output_dir={tmp_path / 'out'}")
  assert_one_line_error(_run(sys.executable, "-m", module, *argv), message)
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_a_missing_folder_is_one_line_and_leaves_nothing(tmp_path):
  out = tmp_path / "new" / "run"
  result = _run(
    sys.executable, "-m", "train.meta_train", f"--output_dir={out}", f"--init_from={tmp_path}/no"
  )
  assert_one_line_error(result, f"--init_from='{tmp_path}/no' names no usable saved optimizer")
  assert not (tmp_path / "new").exists()  # no config.json, no folder
  out.mkdir(parents=True)  # an existing empty folder stays empty
  result = _run(
    sys.executable, "-m", "train.meta_train", f"--output_dir={out}", f"--init_from={tmp_path}/no"
  )
  assert_one_line_error(result, "names no usable saved optimizer")
  assert os.listdir(out) == []


@pytest.mark.slow
def test_a_nonempty_folder_that_is_not_a_run_is_refused(tmp_path):
  (tmp_path / "thesis.tex").write_text("mine")
  result = _run(sys.executable, "-m", "train.meta_train", f"--output_dir={tmp_path}")
  assert_one_line_error(result, "holds files that are not a meta-training run (thesis.tex)")
  assert sorted(os.listdir(tmp_path)) == ["thesis.tex"]
  assert "--allow_nonempty_output_dir" in result.stderr
