"""learned_opt.build validates optimizer configs: every error names the problem and the fix."""

import json
import pathlib

import pytest

import learned_opt
from learned_opt import registry

DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
  "config, message",
  [
    (["lstm"], r"must be a mapping like \{'kind': 'lstm'.*got list"),
    ({"hidden_size": 3}, r"has no 'kind'; add one of lstm, lstm_gac, ntm_bfgs"),
    ({"kind": "gru"}, r"Unknown learned optimizer kind 'gru'; choose one of lstm, lstm_gac"),
    ({"kind": "lstm", "units": 3}, r"Unknown setting 'units' .* hidden_size=20, num_layers=2"),
    ({"kind": "lstm", "hidden_size": "20"}, r"'hidden_size' .* an int, got '20' \(str\)"),
    ({"kind": "lstm", "hidden_size": True}, r"'hidden_size' .* an int, got True \(bool\)"),
    ({"kind": "lstm", "hidden_size": 20.0}, r"'hidden_size' .* an int, got 20.0 \(float\)"),
    ({"kind": "lstm", "output_scale": False}, r"'output_scale' .* a number, got False"),
    ({"kind": "lstm", "preprocess": 1}, r"'preprocess' .* a string, got 1 .*preprocess='none'"),
    ({"kind": "ntm_lbfgs", "max_params": 9}, r"Unknown setting 'max_params'.*memory_window=10"),
    ({"kind": "partition"}, r"needs the setting\(s\) optimizers.*rule='conv_fc'"),
    ({"kind": "partition", "optimizers": ["lstm"]}, r"'optimizers' .* a Mapping, got \["),
    (
      {"kind": "partition", "optimizers": {"fc": {"kind": "lstm", "units": 3}}},
      r"partition group 'fc': Unknown setting 'units'",
    ),
    ({"kind": "lstm", "hidden_size": 0}, r"hidden_size and num_layers must be positive"),
  ],
)
def test_bad_configs_name_the_problem(config, message):
  with pytest.raises(ValueError, match=message):
    learned_opt.build(config)


@pytest.mark.parametrize("kind", [k for k in learned_opt.kinds() if k != "partition"])
def test_every_kind_builds_from_defaults_and_its_config_rebuilds_it(kind):
  config = learned_opt.build({"kind": kind}).config
  assert json.loads(json.dumps(config)) == config  # JSON-able, as saving needs
  assert learned_opt.build(config).config == config
  assert {k: v for k, v in config.items() if k != "kind"} == learned_opt.settings(kind)


def test_lstm_gac_is_the_lstm_with_5_global_cells():
  config = learned_opt.build({"kind": "lstm_gac"}).config
  assert config == {**learned_opt.build({"kind": "lstm"}).config, "global_cells": 5}
  assert config["kind"] == "lstm" and learned_opt.build(config).config == config
  assert learned_opt.build({"kind": "lstm_gac", "global_cells": 2}).config["global_cells"] == 2


def test_float_settings_accept_json_integers_and_record_floats():
  config = learned_opt.build({"kind": "lstm", "output_scale": 1}).config
  assert config["output_scale"] == 1.0 and isinstance(config["output_scale"], float)


def test_settings_lists_defaults_and_required():
  assert learned_opt.settings("lstm")["hidden_size"] == 20
  assert learned_opt.settings("lstm")["global_cells"] == 0
  assert learned_opt.settings("lstm_gac")["global_cells"] == 5
  assert learned_opt.settings("partition") == {"optimizers": registry.REQUIRED, "rule": "conv_fc"}
  with pytest.raises(ValueError, match="choose one of lstm"):
    learned_opt.settings("gru")


def test_registered_kind_is_validated_from_its_signature(monkeypatch):
  monkeypatch.setitem(registry._FACTORIES, "toy", lambda size: learned_opt.lstm_optimizer(size))
  assert "toy" in learned_opt.kinds() and learned_opt.settings("toy") == {"size": registry.REQUIRED}
  assert learned_opt.build({"kind": "toy", "size": 3}).config["hidden_size"] == 3
  with pytest.raises(ValueError, match=r"Unknown setting 'units' .*size=<required>"):
    learned_opt.build({"kind": "toy", "size": 3, "units": 1})


def _saved_configs():
  shipped = pathlib.Path(learned_opt.shipped.directory("mnist_mlp")).parent
  records = sorted(shipped.glob("*/optimizer.json")) + sorted(DATA.glob("*/optimizer.json"))
  return {str(p.relative_to(p.parents[2])): json.loads(p.read_text())["config"] for p in records}


def test_saved_configs_still_build():
  configs = _saved_configs()
  assert {"pretrained/mnist_mlp/optimizer.json", "data/run_format1/optimizer.json"} <= set(configs)
  for path, config in configs.items():
    assert learned_opt.build(config).config == config, path
