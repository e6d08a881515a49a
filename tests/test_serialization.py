"""Saved optimizers: bit-for-bit round trip, and clear errors for every kind of bad file."""

import json
import os
import threading
import time

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
  with open(os.path.join(path, "optimizer.json")) as f:
    return os.path.join(path, json.load(f)["weights_file"])


def test_truncated_weights(saved):
  path = saved[0]
  data = open(_weights(path), "rb").read()
  open(_weights(path), "wb").write(data[: len(data) // 2])
  with pytest.raises(
    ValueError, match=r"meta_params-[0-9a-f]{16}\.msgpack is corrupt or truncated"
  ):
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


def _record(path):
  with open(os.path.join(path, "optimizer.json")) as f:
    return json.load(f)


def test_a_save_killed_before_its_record_leaves_the_previous_optimizer(saved, monkeypatch):
  """Weights and record switch in one step: a save that dies before the record is replaced
  leaves the old optimizer loadable (and a later save removes the orphaned weights)."""
  path, opt, phi = saved
  new_phi = jax.tree.map(lambda x: x + 1.0, phi)
  real_write = learned_opt.tree_files.atomic_write

  def dies_at_the_record(target, data):
    if target.endswith("optimizer.json"):
      raise KeyboardInterrupt  # stands in for a kill between the two writes
    real_write(target, data)

  monkeypatch.setattr(learned_opt.tree_files, "atomic_write", dies_at_the_record)
  with pytest.raises(KeyboardInterrupt):
    learned_opt.save(path, opt, new_phi)
  monkeypatch.undo()
  _, loaded = learned_opt.load(path)
  for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)
  learned_opt.save(path, opt, new_phi)
  weights = [n for n in os.listdir(path) if n.endswith(".msgpack")]
  assert weights == [_record(path)["weights_file"]]


def test_format1_directory_still_loads_and_is_upgraded_by_a_save(saved, tmp_path):
  path, opt, phi = saved
  old = str(tmp_path / "format1")
  os.makedirs(old)
  record = _record(path)
  data = open(os.path.join(path, record.pop("weights_file")), "rb").read()
  open(os.path.join(old, "meta_params.msgpack"), "wb").write(data)
  record["format_version"] = 1
  json.dump(record, open(os.path.join(old, "optimizer.json"), "w"))
  _, loaded = learned_opt.load(old)
  np.testing.assert_array_equal(jax.tree.leaves(loaded)[0], jax.tree.leaves(phi)[0])
  learned_opt.save(old, opt, phi)
  assert not os.path.exists(os.path.join(old, "meta_params.msgpack"))
  learned_opt.load(old)
  for name in learned_opt.pretrained_names():
    learned_opt.pretrained(name)


def _write_weights(path, phi):
  """Replaces the weights of the optimizer at ``path`` by ``phi``, keeping the record valid."""
  record = _record(path)
  data, digest = learned_opt.tree_files.encode(phi)
  open(os.path.join(path, record["weights_file"]), "wb").write(data)
  record["weights_sha256"] = digest
  json.dump(record, open(os.path.join(path, "optimizer.json"), "w"))


def test_load_refuses_non_finite_weights(saved):
  path, _, phi = saved
  bad = jax.tree.map(lambda x: x, phi)
  bad["out"]["b"] = bad["out"]["b"].at[0].set(jnp.nan)
  _write_weights(path, bad)
  with pytest.raises(ValueError, match=r"non-finite weights \(leaf \['out'\]\['b'\]\)"):
    learned_opt.load(path)


def test_dtype_only_mismatch_names_the_dtypes(saved):
  path, _, phi = saved
  _write_weights(path, jax.tree.map(lambda x: np.asarray(x, np.complex64), phi))
  with pytest.raises(
    ValueError, match=r"saved \(\d+, \d+\) complex64, expected \(\d+, \d+\) float32"
  ):
    learned_opt.load(path)


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda r: r["config"].update(num_layers=1000000),
      r"'num_layers'.*must be at most 32, got 1000000",
    ),
    (lambda r: r["config"].update(hidden_size=10**400), r"'hidden_size'.*must be at most 4096"),
    (lambda r: r["config"].update(output_scale=float("inf")), r"'output_scale'.*finite"),
    (lambda r: r["config"].update(hidden_size="20"), r"'hidden_size'.*must be an int"),
    (lambda r: r.update(config=[1, 2]), r"field 'config' must be a JSON object"),
    (lambda r: r.update(format_version="1"), r"field 'format_version' must be a positive int"),
    (lambda r: r.update(weights_file="../../etc/x"), r"field 'weights_file' must name"),
    (lambda r: r.update(weights_sha256=7), r"field 'weights_sha256' must be a JSON string"),
    (lambda r: r.update(metadata="note"), r"field 'metadata' must be a JSON object"),
  ],
)
def test_crafted_records_are_refused_fast_naming_the_field(saved, edit, message):
  path = saved[0]
  record = _record(path)
  edit(record)
  with open(os.path.join(path, "optimizer.json"), "w") as f:
    f.write(json.dumps(record))
  with pytest.raises(ValueError, match=message):
    learned_opt.load(path)


def test_deeply_nested_record_is_a_value_error(saved):
  path = saved[0]
  with open(os.path.join(path, "optimizer.json"), "w") as f:
    f.write("[" * 100000 + "]" * 100000)
  with pytest.raises(ValueError, match="optimizer.json is corrupt"):
    learned_opt.load(path)


def test_build_refuses_non_finite_settings():
  with pytest.raises(ValueError, match=r"'input_scale'.*finite number, got nan"):
    learned_opt.build({"kind": "lstm", "input_scale": float("nan")})


def _tiny():
  opt = learned_opt.build({"kind": "lstm", "hidden_size": 2, "num_layers": 1})
  phi = opt.init_meta_params(jax.random.key(0))
  return opt, phi, jax.tree.map(lambda x: x + 1.0, phi)


def _digest(phi):
  return learned_opt.tree_files.encode(phi)[1]


def test_loads_during_continuous_saves_return_one_of_the_saved_optimizers(tmp_path):
  """A reader of a live run's optimizer: each save removes the weights the previous record
  named, possibly between a load reading that record and opening them; load rereads it."""
  opt, phi_a, phi_b = _tiny()
  path = str(tmp_path / "live")
  learned_opt.save(path, opt, phi_a)
  stop, saves = threading.Event(), []

  def keep_saving():
    while not stop.is_set():
      learned_opt.save(path, opt, phi_b if len(saves) % 2 else phi_a)
      saves.append(1)

  saver = threading.Thread(target=keep_saving)
  saver.start()
  loaded, deadline = [], time.monotonic() + 4.0
  try:
    while len(loaded) < 400 and time.monotonic() < deadline:
      loaded.append(_digest(learned_opt.load(path).meta_params))
  finally:
    stop.set()
    saver.join()
  assert len(loaded) >= 50 and len(saves) >= 10, (len(loaded), len(saves))  # they overlapped
  assert set(loaded) <= {_digest(phi_a), _digest(phi_b)}


def _save_before_reading_weights(monkeypatch, path, opt, phis):
  """Makes every read of a weights file first save the next of ``phis`` (a save racing it)."""
  real_read, queue = learned_opt.tree_files.read_regular, list(phis)

  def racing_read(target):
    if target.endswith(".msgpack") and queue:
      learned_opt.save(path, opt, queue.pop(0))
    return real_read(target)

  monkeypatch.setattr(learned_opt.tree_files, "read_regular", racing_read)


def test_a_save_between_record_and_weights_makes_load_read_the_new_record(tmp_path, monkeypatch):
  opt, phi_a, phi_b = _tiny()
  path = str(tmp_path / "opt")
  learned_opt.save(path, opt, phi_a)
  _save_before_reading_weights(monkeypatch, path, opt, [phi_b])
  assert _digest(learned_opt.load(path).meta_params) == _digest(phi_b)


def test_load_gives_up_clearly_when_every_record_is_replaced_before_its_weights_are_read(
  tmp_path, monkeypatch
):
  opt, phi_a, phi_b = _tiny()
  path = str(tmp_path / "opt")
  learned_opt.save(path, opt, phi_a)
  _save_before_reading_weights(monkeypatch, path, opt, [phi_b, phi_a] * 50)
  with pytest.raises(ValueError, match=r"optimizer.json was replaced 20 times while loading it"):
    learned_opt.load(path)


def test_weights_missing_under_an_unchanged_record_is_named(saved):
  path = saved[0]
  os.remove(_weights(path))
  with pytest.raises(FileNotFoundError, match=r"meta_params-[0-9a-f]{16}\.msgpack is missing"):
    learned_opt.load(path)
