"""Saved optimizers: bit-for-bit round trip, and clear errors for every kind of bad file."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt


@pytest.fixture
def saved(tmp_path):
  opt = learned_opt.lstm_optimizer(hidden_size=6, preprocess="log_sign", output_scale=0.1)
  phi = opt.init_meta_params(jax.random.key(7))
  path = str(tmp_path / "opt")
  learned_opt.save(path, opt, phi, metadata={"note": "test"})
  return path, opt, phi


def test_round_trip_bit_for_bit(saved):
  path, opt, phi = saved
  loaded_opt, loaded_phi = learned_opt.load(path)
  assert loaded_opt.config == opt.config
  for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(loaded_phi), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert learned_opt.load_metadata(path) == {"note": "test"}
  # The loaded optimizer goes straight into optax and behaves identically.
  g = {"x": jnp.array([0.3, -2.0])}
  tx_a, tx_b = learned_opt.as_optax(opt, phi), learned_opt.as_optax(learned_opt.load(path))
  np.testing.assert_array_equal(
    tx_a.update(g, tx_a.init(g))[0]["x"], tx_b.update(g, tx_b.init(g))[0]["x"]
  )


def _weights(path):
  return os.path.join(path, learned_opt.serialization.WEIGHTS_FILE)


def test_truncated_weights(saved):
  path = saved[0]
  data = open(_weights(path), "rb").read()
  open(_weights(path), "wb").write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"meta_params.msgpack is corrupt or truncated"):
    learned_opt.load(path)


def test_bit_flip(saved):
  path = saved[0]
  data = bytearray(open(_weights(path), "rb").read())
  data[len(data) // 2] ^= 0x01
  open(_weights(path), "wb").write(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    learned_opt.load(path)


def test_newer_format_version(saved):
  path = saved[0]
  record_path = os.path.join(path, "optimizer.json")
  record = json.load(open(record_path))
  record["format_version"] = 99
  json.dump(record, open(record_path, "w"))
  with pytest.raises(ValueError, match="format version 99.*upgrade"):
    learned_opt.load(path)


def test_other_architecture(saved):
  path, _, _ = saved
  with pytest.raises(ValueError, match="differs from the expected"):
    learned_opt.load(path, optimizer=learned_opt.lstm_optimizer(hidden_size=7))
  # A record edited to another size no longer fits its weights.
  record_path = os.path.join(path, "optimizer.json")
  record = json.load(open(record_path))
  record["config"]["hidden_size"] = 7
  json.dump(record, open(record_path, "w"))
  with pytest.raises(ValueError, match="does not fit config"):
    learned_opt.load(path)


def test_corrupt_record_and_missing_dir(saved, tmp_path):
  path = saved[0]
  open(os.path.join(path, "optimizer.json"), "w").write("{not json")
  with pytest.raises(ValueError, match="optimizer.json is corrupt"):
    learned_opt.load(path)
  with pytest.raises(FileNotFoundError, match="No saved optimizer"):
    learned_opt.load(str(tmp_path / "nowhere"))


def test_refuses_to_save_non_finite(tmp_path):
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  phi = opt.init_meta_params(jax.random.key(0))
  phi["out"]["b"] = phi["out"]["b"].at[0].set(jnp.nan)
  with pytest.raises(ValueError, match="non-finite"):
    learned_opt.save(str(tmp_path / "bad"), opt, phi)
  assert not os.path.exists(tmp_path / "bad" / "optimizer.json")
