"""The meta-training job end to end: outputs, determinism, learning, non-finite steps."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from tasks import quadratic
from tasks.base import TaskFamily
from train import checkpoint, distributed, meta_step, run_dir, trainer, unroll
from train.config import MetaTrainConfig

# The trainer end to end: every test runs meta-training jobs (slow tier).
pytestmark = pytest.mark.slow


def tiny_config(output_dir, **overrides):
  settings = dict(
    output_dir=str(output_dir),
    task_kwargs={"dim": 4},
    optimizer_kwargs={"hidden_size": 6},
    unroll=5,
    horizon=10,
    num_problems=4,
    num_epochs=2,
    steps_per_epoch=4,
    valid_problems=8,
    log_every=2,
    checkpoint_every=3,
    meta_lr=1e-2,
  )
  settings.update(overrides)
  return MetaTrainConfig(**settings)


def leaves_equal(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_outputs_and_same_seed_same_result(tmp_path):
  state_a, progress_a = trainer.train(tiny_config(tmp_path / "a"), log=lambda s: None)
  state_b, progress_b = trainer.train(tiny_config(tmp_path / "b"), log=lambda s: None)
  assert leaves_equal(state_a.meta_params, state_b.meta_params)
  assert progress_a.valid_history == progress_b.valid_history
  assert int(state_a.step) == 8 and len(progress_a.valid_history) == 2
  run = tmp_path / "a"
  saved = json.load(open(run / "config.json"))
  assert saved["task_kwargs"] == {"dim": 4}
  records = [json.loads(line) for line in open(run / "metrics.jsonl")]
  assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
  assert all(np.isfinite(r["meta_loss"]) for r in records if "meta_loss" in r)
  # The best phi is what learned_opt.load(output_dir) returns.
  _, phi = learned_opt.load(str(run))
  assert leaves_equal(phi, state_a.best_meta_params)
  assert sorted(os.listdir(run / "checkpoints")) == [
    "step_00000004",
    "step_00000006",
    "step_00000008",
  ]
  other = trainer.train(tiny_config(tmp_path / "c", seed=1), log=lambda s: None)[0]
  assert not leaves_equal(other.meta_params, state_a.meta_params)


def test_resume_refuses_a_different_config(tmp_path):
  trainer.train(tiny_config(tmp_path), log=lambda s: None)
  with pytest.raises(ValueError, match=r"different config.*--meta_lr \(saved 0.01, now 0.5\)"):
    trainer.train(tiny_config(tmp_path, meta_lr=0.5), log=lambda s: None)
  with pytest.raises(ValueError, match=r"different config.*--optimizer/--optimizer_kwargs"):
    trainer.train(tiny_config(tmp_path, optimizer_kwargs={"hidden_size": 7}), log=lambda s: None)


def test_resume_accepts_changes_that_do_not_change_results(tmp_path):
  """Reporting settings and spelling out an optimizer default are no difference."""
  trainer.train(tiny_config(tmp_path), log=lambda s: None)
  same = tiny_config(
    tmp_path, log_every=3, checkpoint_every=5, optimizer_kwargs={"hidden_size": 6, "num_layers": 2}
  )
  state, _ = trainer.train(same, log=lambda s: None)
  assert int(state.step) == 8


def test_an_old_format_run_directory_resumes_to_the_same_phi(tmp_path):
  """tests/data/run_format1 was written by the trainer before the train state and config changed
  (flat optimizer flags, format-1 checkpoint at meta-step 4). Resumed today, it must end with the
  phi its own uninterrupted run reached."""
  data = os.path.join(os.path.dirname(__file__), "data")
  run = tmp_path / "old_run"
  shutil.copytree(os.path.join(data, "run_format1"), run)
  old = json.load(open(run / "config.json"))
  config = MetaTrainConfig(
    output_dir=str(run),
    task_kwargs=old["task_kwargs"],
    optimizer_kwargs={"hidden_size": 6, "preprocess": "log_sign", "output_scale": 0.5},
    **{
      k: old[k]
      for k in (
        "unroll",
        "horizon",
        "num_problems",
        "num_epochs",
        "steps_per_epoch",
        "valid_problems",
        "log_every",
        "checkpoint_every",
        "meta_lr",
      )
    },
  )
  logs = []
  state, progress = trainer.train(config, log=logs.append)
  assert "Resumed from meta-step 4" in logs[0] and int(state.step) == 8
  reference = np.load(os.path.join(data, "run_format1_final_phi.npz"))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.meta_params):
    np.testing.assert_allclose(leaf, reference[jax.tree_util.keystr(path)], rtol=2e-5, atol=1e-7)
  old_history = json.load(open(os.path.join(data, "run_format1_final_host.json")))["valid_history"]
  np.testing.assert_allclose(progress.valid_history, old_history, rtol=1e-4)


def test_resume_accepts_a_config_saved_before_a_field_existed(tmp_path):
  """A run started before a field was added used that field's default: it resumes."""
  config = tiny_config(tmp_path)
  trainer.train(config, log=lambda s: None)
  path = tmp_path / "config.json"
  saved = json.load(open(path))
  del saved["meta_lr_schedule"], saved["meta_lr_final_ratio"]
  path.write_text(json.dumps(saved))
  logs = []
  state, _ = trainer.train(config, log=logs.append)
  assert int(state.step) == 8 and "Resumed from meta-step 8" in logs[0]
  with pytest.raises(ValueError, match="different config"):
    trainer.train(tiny_config(tmp_path, meta_lr_schedule="cosine"), log=lambda s: None)


def test_cosine_meta_learning_rate_decays_to_its_final_ratio(tmp_path):
  config = tiny_config(tmp_path, meta_lr_schedule="cosine", meta_lr_final_ratio=0.1)
  schedule = meta_step.meta_learning_rate(config)
  assert schedule(0) == pytest.approx(1e-2)
  assert schedule(config.total_steps // 2) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
  assert schedule(config.total_steps) == pytest.approx(1e-3)
  assert meta_step.meta_learning_rate(tiny_config(tmp_path)) == 1e-2
  # Adam on a constant gradient steps by exactly lr_k per entry: the schedule is what is applied.
  meta_opt = meta_step.meta_optimizer(config)
  grads = {"w": jnp.array([2.0, -0.5])}
  opt_state = meta_opt.init(grads)
  for k in range(config.total_steps):
    updates, opt_state = meta_opt.update(grads, opt_state)
    np.testing.assert_allclose(updates["w"], [-schedule(k), schedule(k)], rtol=1e-4)


def test_learned_optimizer_learns(tmp_path):
  """A short real meta-training run must beat its own untrained starting point by far."""
  config = tiny_config(
    tmp_path,
    task_kwargs={"dim": 10},
    optimizer_kwargs={"hidden_size": 20},
    unroll=20,
    horizon=100,
    num_problems=32,
    num_epochs=1,
    steps_per_epoch=150,
    valid_problems=64,
    meta_lr=3e-3,
    log_every=50,
    checkpoint_every=1000,
  )
  task, opt = trainer.build(config)
  validate = jax.jit(meta_step.make_validate(config, task, opt))
  start = meta_step.init_state(config, task, opt).meta_params
  problems = meta_step.sample_valid_problems(config, task)
  before = float(jnp.mean(validate(start, task.data, *problems)[:, -1]))
  _, progress = trainer.train(config, log=lambda s: None)
  assert progress.best_valid < before / 5, (before, progress.best_valid)


def test_valid_seed_sets_the_validation_problems_alone(tmp_path):
  """Runs of different seeds given one --valid_seed validate on the same problems, and nothing
  else they draw moves; -1 (the default) keeps --seed's validation problems."""
  config = lambda **kw: MetaTrainConfig(output_dir=str(tmp_path), task="quadratic", **kw)
  task, opt = trainer.build(config(valid_problems=4))
  draw = lambda c: meta_step.sample_valid_problems(c, task)[0]["w"]
  shared = config(seed=1, valid_seed=0, valid_problems=4)
  np.testing.assert_array_equal(draw(shared), draw(config(seed=0, valid_problems=4)))
  assert not np.allclose(draw(shared), draw(config(seed=1, valid_problems=4)))
  np.testing.assert_array_equal(
    draw(config(seed=1, valid_seed=-1, valid_problems=4)), draw(config(seed=1, valid_problems=4))
  )
  same_key = lambda a, b: np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
  assert same_key(meta_step.problem_key(shared, 3), meta_step.problem_key(config(seed=1), 3))
  assert not same_key(meta_step.problem_key(shared, 3), meta_step.problem_key(config(seed=0), 3))
  first = lambda c: meta_step.init_state(c, task, opt).meta_params
  jax.tree.map(np.testing.assert_array_equal, first(shared), first(config(seed=1)))


def tagged_quadratic(poisoned_tags=()):
  """A quadratic whose loss is NaN on problems whose random tag is in ``poisoned_tags``."""
  base = quadratic(dim=4)
  poisoned = jnp.asarray(poisoned_tags, jnp.float32).reshape(-1)

  def sample(data, key):
    return {**base.sample(data, key), "tag": jax.random.uniform(jax.random.fold_in(key, 99))}

  def loss(data, task_params, params, key):
    value = base.loss(data, task_params, params, key)
    bad = jnp.any(task_params["tag"] == poisoned)
    return jnp.where(bad, jnp.nan, value)

  return TaskFamily("quadratic", sample, base.init, loss, base.config)


def test_nan_at_a_chosen_meta_step_is_skipped(tmp_path):
  config = tiny_config(tmp_path, num_epochs=3)
  chosen = 4  # problems are resampled every horizon / unroll = 2 meta-steps
  clean = tagged_quadratic()
  _, opt = trainer.build(config)
  phi = opt.init_meta_params(jax.random.key(0))
  drawn = unroll.init_inner_batch(clean, opt, phi, (), meta_step.problem_key(config, chosen), 4)
  messages = []
  state, _ = trainer.train(
    config, task=tagged_quadratic(drawn.task_params["tag"][:1]), log=messages.append
  )
  assert int(state.skips.total) == 1 and int(state.skips.last_step) == chosen
  assert any(f"Non-finite meta-step {chosen} " in m for m in messages)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.meta_params))
  _, saved = learned_opt.load(config.output_dir)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(saved))


def test_always_nan_stops_with_a_message(tmp_path):
  always = TaskFamily(
    "quadratic",
    quadratic(dim=4).sample,
    quadratic(dim=4).init,
    lambda data, p, theta, key: jnp.nan * jnp.sum(theta["theta"]),
    {"name": "quadratic"},
  )
  config = tiny_config(tmp_path, max_consecutive_skips=3)
  with pytest.raises(
    trainer.NonFiniteError, match=r"3 consecutive non-finite .* step 2 on task quadratic"
  ):
    trainer.train(config, task=always, log=lambda s: None)
  assert not os.path.exists(os.path.join(config.output_dir, "optimizer.json"))


def test_early_stopping_is_remembered(tmp_path):
  config = tiny_config(tmp_path, num_epochs=6, patience=1, meta_lr=5.0, meta_grad_clip=0.0)
  messages = []
  _, progress = trainer.train(config, log=messages.append)
  if not progress.early_stopped:
    pytest.fail(f"expected early stopping with a huge meta_lr; history {progress.valid_history}")
  assert len(progress.valid_history) < 6
  # The early-stopping decision is in the epoch's one checkpoint: a kill after it cannot undo it.
  ckpt_dir = os.path.join(config.output_dir, "checkpoints")
  newest = checkpoint.all_steps(ckpt_dir)[-1]
  meta = json.load(open(os.path.join(checkpoint.path_of(ckpt_dir, newest), "meta.json")))
  assert newest == len(progress.valid_history) * 4 and meta["host"]["early_stopped"] is True
  again = []
  trainer.train(config, log=again.append)
  assert any("already stopped early" in m for m in again)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One finished tiny run (checkpoints at 4, 6 and 8); tests copy it before changing it."""
  config = tiny_config(tmp_path_factory.mktemp("finished") / "run")
  state, progress = trainer.train(config, log=lambda s: None)
  return config, state, progress


@pytest.fixture
def run_copy(finished, tmp_path):
  config = tiny_config(tmp_path / "run")
  shutil.copytree(finished[0].output_dir, config.output_dir)
  return config


def metric_keys(output_dir):
  records = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
  return [(r["step"], "epoch" in r, "meta_loss" in r) for r in records]


def test_resume_after_leftovers_and_junk_ends_clean(finished, run_copy):
  """A resumed run removes temporaries left by kills and junk checkpoints (which count toward
  nothing), survives a regular file named like its next checkpoint, and records each step once."""
  out = run_copy.output_dir
  ckpt_dir = os.path.join(out, "checkpoints")
  shutil.rmtree(os.path.join(ckpt_dir, "step_00000008"))
  open(os.path.join(ckpt_dir, "step_00000008"), "w").write("not a checkpoint")
  os.makedirs(os.path.join(ckpt_dir, "step_99999999"))
  open(os.path.join(ckpt_dir, "step_99999999", "meta.json"), "w").write("{}")
  os.makedirs(os.path.join(ckpt_dir, ".tmp-abc123"))
  open(os.path.join(out, ".tmp-xyz"), "w").write("half")
  logs = []
  state, _ = trainer.train(tiny_config(out, keep_checkpoints=1), log=logs.append)
  assert "Resumed from meta-step 6" in " ".join(logs)
  assert sorted(os.listdir(ckpt_dir)) == ["step_00000008"]
  assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
  keys = metric_keys(out)
  assert len(keys) == len(set(keys)) and keys == metric_keys(finished[0].output_dir)
  assert leaves_equal(state.meta_params, finished[1].meta_params)


def test_no_usable_checkpoint_is_an_error_not_a_restart(run_copy):
  ckpt_dir = os.path.join(run_copy.output_dir, "checkpoints")
  for step in checkpoint.all_steps(ckpt_dir):
    open(os.path.join(checkpoint.path_of(ckpt_dir, step), "state.msgpack"), "ab").write(b"x")
  with pytest.raises(run_dir.RunDirError, match=r"none is usable: .*step_00000008.*step_00000004"):
    trainer.train(run_copy, log=lambda s: None)


def test_missing_config_json_refuses_to_resume(run_copy):
  os.remove(os.path.join(run_copy.output_dir, "config.json"))
  with pytest.raises(run_dir.RunDirError, match="config.json is missing"):
    trainer.train(run_copy, log=lambda s: None)


def _edit_meta(path, edit, rehash):
  meta_path = os.path.join(path, "meta.json")
  meta = json.load(open(meta_path))
  meta = edit(meta)
  if rehash:
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
  open(meta_path, "w").write(json.dumps(meta))


@pytest.mark.parametrize(
  "edit, rehash, reason",
  [
    (lambda m: {**m, "host": {**m["host"], "early_stopped": True}}, False, "altered"),
    (lambda m: [m], False, "not a checkpoint record"),
    (lambda m: {**m, "host": "x"}, True, "no host object"),
    (lambda m: {**m, "host": {**m["host"], "valid_history": "x"}}, True, "valid_history"),
    (lambda m: {**m, "host": {**m["host"], "diverged_history": [1]}}, True, "diverged_history"),
  ],
)
def test_an_edited_or_malformed_meta_json_is_skipped(run_copy, edit, rehash, reason):
  config = run_copy
  ckpt_dir = os.path.join(config.output_dir, "checkpoints")
  _edit_meta(checkpoint.path_of(ckpt_dir, 8), edit, rehash)
  task, opt = trainer.build(config)
  logs = []
  state, progress = run_dir.resume_or_start(config, task, opt, ckpt_dir, logs.append)
  assert int(state.step) == 6 and not progress.early_stopped
  assert reason in logs[0] and "step_00000008" in logs[0]
  assert checkpoint.all_steps(ckpt_dir) == [4, 6]


def test_num_epochs_can_grow_on_resume(finished, tmp_path):
  grown, _ = trainer.train(tiny_config(tmp_path / "longer", num_epochs=3), log=lambda s: None)
  run = tmp_path / "extended"
  shutil.copytree(finished[0].output_dir, run)
  logs = []
  state, progress = trainer.train(tiny_config(run, num_epochs=3), log=logs.append)
  assert "Resumed from meta-step 8" in logs[0] and int(state.step) == 12
  assert len(progress.valid_history) == 3
  assert leaves_equal(state.meta_params, grown.meta_params)


def test_a_step_that_makes_phi_or_adam_non_finite_is_skipped(tmp_path):
  """Finite loss and gradients, but a NaN clip threshold poisons the update: skipped."""
  config = tiny_config(tmp_path)
  object.__setattr__(config, "meta_grad_clip", float("nan"))  # the config refuses it; bypass
  task, opt = trainer.build(config)
  state = meta_step.init_state(config, task, opt)
  before = jax.tree.map(np.asarray, state.meta_params)
  step = jax.jit(meta_step.make_train_step(config, task, opt))
  state, metrics = step(state, task.data)
  assert np.isfinite(float(metrics.meta_loss)) and not bool(metrics.finite)
  assert int(state.skips.total) == 1
  assert leaves_equal(state.meta_params, before)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.meta_opt_state))


def test_one_diverged_validation_problem_does_not_hide_the_epoch(tmp_path):
  """Validation compares (problems diverged, mean final loss of the others)."""
  config = tiny_config(tmp_path)
  task, opt = trainer.build(config)
  state = meta_step.init_state(config, task, opt)
  curves = np.ones((8, 11), np.float32)
  curves[3, -1] = np.inf
  logs = []
  state, progress = trainer.end_epoch(config, opt, state, run_dir.Progress(), curves, logs.append)
  assert progress.best_valid == 1.0 and progress.diverged_history == (1,)
  assert "(1 of 8 problems diverged)" in logs[0] and "(saved)" in logs[0]
  assert learned_opt.load_metadata(str(tmp_path))["valid_diverged"] == 1
  # Fewer diverged problems win over a lower mean; all diverged is never saved.
  curves[3, -1] = 5.0
  _, better = trainer.end_epoch(config, opt, state, progress, curves, logs.append)
  assert better.best_valid == 1.5 and "(saved)" in logs[-1]
  _, worse = trainer.end_epoch(
    config, opt, state, better, np.full((8, 11), np.nan, np.float32), logs.append
  )
  assert worse.best_valid == 1.5 and "(saved)" not in logs[-1]
  assert run_dir.best_epoch(worse) == 1


def test_a_moved_run_resumes_under_any_spelling_of_its_path(run_copy, tmp_path, monkeypatch):
  """The resume guard compares settings, not the --output_dir string."""
  monkeypatch.chdir(tmp_path)
  for spelling in (run_copy.output_dir + "/", "run", "../" + tmp_path.name + "/run"):
    logs = []
    state, _ = trainer.train(tiny_config(spelling, log_every=1), log=logs.append)
    assert "Resumed from meta-step 8" in logs[0] and int(state.step) == 8


def test_a_checkpoint_from_a_newer_library_is_refused_and_kept(run_copy):
  ckpt_dir = os.path.join(run_copy.output_dir, "checkpoints")
  _edit_meta(checkpoint.path_of(ckpt_dir, 8), lambda m: {**m, "format_version": 99}, True)
  with pytest.raises(run_dir.RunDirError, match="format version 99, newer than this library"):
    trainer.train(run_copy, log=lambda s: None)
  assert checkpoint.all_steps(ckpt_dir) == [4, 6, 8]


def test_validation_draws_from_valid_task_kwargs(tmp_path):
  """--valid_task_kwargs builds validation's own task: here 6-d quadratics beside 4-d training."""
  config = tiny_config(tmp_path, num_epochs=1, valid_task_kwargs={"dim": 6})
  state, progress = trainer.train(config, log=lambda s: None)
  task, opt = trainer.build(config)
  valid_task = trainer.validation_task(config, task)
  validate = jax.jit(meta_step.make_validate(config, valid_task, opt))
  problems = meta_step.sample_valid_problems(config, valid_task)
  assert problems[0]["w"].shape == (config.valid_problems, 6, 6)
  curves = validate(state.meta_params, valid_task.data, *problems)
  np.testing.assert_allclose(progress.valid_history[-1], float(jnp.mean(curves[:, -1])), rtol=1e-6)
  with pytest.raises(ValueError, match="--valid_task_kwargs: task 'quadratic' has no setting"):
    tiny_config(tmp_path, valid_task_kwargs={"split": "valid"})


def test_init_from_starts_phi_from_a_saved_optimizer_and_resumes_without_it(finished, tmp_path):
  """--init_from: a fresh run's phi is the saved optimizer's (whatever the seed), training goes
  on from there, and a resume reads its own checkpoint, not the source (gone by then)."""
  source = tmp_path / "source"
  shutil.copytree(finished[0].output_dir, source)
  _, saved_phi = learned_opt.load(str(source))
  run = tmp_path / "fine_tuned"
  config = tiny_config(run, init_from=str(source), seed=3, num_epochs=1)
  task, opt = trainer.build(config)
  state, _ = run_dir.resume_or_start(config, task, opt, str(run / "checkpoints"), lambda s: None)
  assert leaves_equal(state.meta_params, saved_phi)
  assert leaves_equal(state.best_meta_params, saved_phi)
  assert not leaves_equal(meta_step.init_state(config, task, opt).meta_params, saved_phi)
  mesh = distributed.global_mesh(jax.devices()[:2])  # several devices: drawn on the mesh
  data = distributed.put(task.data, distributed.replicated(mesh))
  on_mesh = meta_step.init_sharded_state(config, task, opt, data, mesh)
  assert leaves_equal(on_mesh.meta_params, saved_phi)
  tuned, _ = trainer.train(config, log=lambda s: None)
  assert not leaves_equal(tuned.meta_params, saved_phi)
  shutil.rmtree(source)
  logs = []
  resumed, _ = trainer.train(tiny_config(run, init_from=str(source), seed=3), log=logs.append)
  assert "Resumed from meta-step 4" in logs[0] and int(resumed.step) == 8
  # The shipped optimizers are sources too, by name.
  quadratic = learned_opt.pretrained("quadratic")
  shipped = dict(quadratic.optimizer.config)
  kwargs = {k: v for k, v in shipped.items() if k != "kind"}
  named = tiny_config(tmp_path / "x", init_from="pretrained:quadratic", optimizer_kwargs=kwargs)
  phi = meta_step.saved_start(named, trainer.build(named)[1])
  assert leaves_equal(phi, quadratic.meta_params)


def test_init_from_refuses_a_missing_source_or_another_architecture(finished, tmp_path):
  missing = tiny_config(tmp_path / "a", init_from=str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match=r"--init_from=.*names no usable saved optimizer"):
    trainer.train(missing, log=lambda s: None)
  with pytest.raises(ValueError, match=r"No pretrained optimizer named 'nope'"):
    trainer.train(tiny_config(tmp_path / "b", init_from="pretrained:nope"), log=lambda s: None)
  other = tiny_config(
    tmp_path / "c", init_from=finished[0].output_dir, optimizer_kwargs={"hidden_size": 7}
  )
  mismatch = r"holds an optimizer with config .*'hidden_size': 6.*--preset"
  with pytest.raises(ValueError, match=mismatch):
    trainer.train(other, log=lambda s: None)
  assert not os.path.exists(tmp_path / "c" / "checkpoints") or not os.listdir(
    tmp_path / "c" / "checkpoints"
  )
