"""The meta-step's memory estimate: traced without compiling, checked against XLA's own count."""

import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from mnist_files import write_mnist

from train import cgroup, distributed, memory, meta_step, trainer
from train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(tmp_path, **settings):
  config = config_lib.MetaTrainConfig(output_dir=str(tmp_path), **settings)
  return (config, *trainer.build(config))


def _compiled_bytes(config, task, optimizer) -> int:
  """What XLA assigns the jitted meta-step: temporaries, arguments and outputs (not aliased)."""
  state = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  step = jax.jit(meta_step.make_train_step(config, task, optimizer), donate_argnums=0)
  stats = step.lower(state, task.data).compile().memory_analysis()
  return (
    stats.temp_size_in_bytes
    + stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
  )


def test_residuals_grow_linearly_in_problems_and_unroll(tmp_path):
  config, task, optimizer = _setup(tmp_path, num_problems=4)
  four, phi, problems_four = memory.residual_bytes(config, task, optimizer, 4)
  eight, phi_again, problems_eight = memory.residual_bytes(config, task, optimizer, 8)
  assert eight == 2 * four > 0 and problems_eight == 2 * problems_four > 0
  assert (
    phi
    == phi_again
    == 4 * sum(x.size for x in jax.tree.leaves(optimizer.init_meta_params(jax.random.key(0))))
  )
  short = config_lib.MetaTrainConfig(output_dir=str(tmp_path), unroll=10)
  half, _, _ = memory.residual_bytes(short, task, optimizer, 4)
  assert 0.45 < half / four < 0.55


@pytest.mark.slow
def test_estimate_bounds_what_xla_assigns_the_compiled_step(tmp_path):
  """On a small MNIST MLP (the real ones, and quadratics, were checked by hand: BUILD.md)."""
  write_mnist(str(tmp_path / "mnist"), sizes=(("train", 64), ("test", 8)))
  kwargs = {"mnist_dir": str(tmp_path / "mnist"), "batch_size": 32}
  config, task, optimizer = _setup(
    tmp_path, task="mnist_mlp", task_kwargs=kwargs, num_problems=2, unroll=10, horizon=20
  )
  estimate = memory.estimate(config, task, optimizer)
  compiled = _compiled_bytes(config, task, optimizer)
  # An upper bound, and not a loose one.
  assert compiled <= estimate.total_bytes <= 1.2 * compiled, (estimate, compiled)


def test_an_oversized_run_is_refused_with_the_estimate_and_the_flag_to_lower(tmp_path):
  config, task, optimizer = _setup(tmp_path, num_problems=64)
  needed = memory.estimate(config, task, optimizer).total_bytes
  headroom = memory.COMPILE_HEADROOM
  with pytest.raises(ValueError) as error:
    memory.check(config, task, optimizer, available=needed // 4 + headroom)
  message = str(error.value)
  assert "--num_problems=64 (--unroll=20) needs about" in message
  fits = int(message.split("lower --num_problems to ")[1].split()[0])
  smaller = config_lib.MetaTrainConfig(output_dir=str(tmp_path), num_problems=fits)
  assert 1 <= fits < 64
  assert memory.estimate(smaller, task, optimizer).total_bytes <= needed // 4
  assert memory.check(config, task, optimizer, available=needed + headroom) == memory.estimate(
    config, task, optimizer
  )


def test_splitting_problems_among_devices_divides_all_but_the_data(tmp_path):
  estimate = memory.MemoryEstimate(1000, 10, 40, 50, 1350)  # fixed: 2 * 10 + 50
  assert memory.per_device_bytes(estimate, 4) == 70 + 320
  assert memory.largest_fitting(estimate, 10, 70 + 256, devices=4) == 8


def test_available_memory_is_known_on_this_machine():
  available = memory.available_bytes()
  assert available is None or available > 2**20


@pytest.mark.slow
def test_the_command_line_refuses_an_oversized_run_before_compiling(tmp_path):
  out = tmp_path / "new" / "run"
  result = subprocess.run(
    [sys.executable, "-m", "train.meta_train", f"--output_dir={out}", "--num_problems=100000000"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "A meta-step of --num_problems=100000000 (--unroll=20) needs about" in result.stderr
  assert "lower --num_problems to" in result.stderr
  assert not (tmp_path / "new").exists()  # the folders it would have made are gone


def test_an_optimizer_too_large_by_itself_is_told_to_shrink(tmp_path):
  kwargs = {"hidden_size": 64, "num_layers": 3}
  config, task, optimizer = _setup(tmp_path, num_problems=8, optimizer_kwargs=kwargs)
  estimate = memory.estimate(config, task, optimizer)
  assert 2 * estimate.meta_bytes > estimate.data_bytes
  with pytest.raises(ValueError) as error:  # its weights and Adam state alone do not fit
    memory.check(config, task, optimizer, available=estimate.fixed_bytes + memory.COMPILE_HEADROOM)
  message = str(error.value)
  assert "the optimizer alone takes" in message and "use a smaller optimizer" in message
  assert """--optimizer_kwargs='{"hidden_size": 64, "num_layers": 3}'""" in message
  assert "lower --num_problems" not in message and "lower --unroll" not in message


@pytest.mark.parametrize(
  "data_bytes, fixed_room, advice",
  [
    (10**9, 0, "the task's data set alone takes 954 MiB"),  # data, not the optimizer
    (50, 500, "lower --unroll (now 20), or use a smaller optimizer"),  # one problem too many
  ],
)
def test_the_advice_names_the_part_that_does_not_fit(
  data_bytes, fixed_room, advice, tmp_path, monkeypatch
):
  config, task, optimizer = _setup(tmp_path, num_problems=10)
  estimate = memory.MemoryEstimate(10_000, 10, 400, data_bytes, 20 + data_bytes + 10_000)
  monkeypatch.setattr(memory, "estimate", lambda *args: estimate)
  available = estimate.fixed_bytes + memory.COMPILE_HEADROOM + fixed_room
  with pytest.raises(ValueError, match=re.escape(f"is available; {advice}")):
    memory.check(config, task, optimizer, available=available)


def test_the_memory_and_mesh_refusals_suggest_the_same_largest_count(tmp_path):
  """Once the memory check suggested --num_problems=N, the mesh's suggests none above N."""
  config, task, optimizer = _setup(tmp_path, num_problems=64)
  estimate = memory.estimate(config, task, optimizer)
  available = memory.per_device_bytes(estimate) // 4 + memory.COMPILE_HEADROOM
  most = memory.largest_fitting(estimate, 64, available - memory.COMPILE_HEADROOM)
  size = next(m for m in (3, 5, 7) if most % m)  # a mesh that `most` problems do not divide
  with pytest.raises(ValueError) as error:
    memory.check(config, task, optimizer, available=available, multiple=size)
  suggested = int(str(error.value).split("lower --num_problems to ")[1].split()[0])
  assert suggested == most // size * size == memory.most_problems(estimate, 64, available, 1, size)
  assert f"a multiple of the mesh's {size} devices" in str(error.value)

  mesh = types.SimpleNamespace(devices=np.empty(size, object))
  fits = memory.problems_fit(estimate, 64, available, shared=True)
  with pytest.raises(distributed.MeshError) as error:  # the count the memory check allowed
    distributed.check_divides(most, mesh, "num_problems", fits=fits)
  assert f"Use --num_problems={suggested}," in str(error.value)  # not the next multiple up
  assert f"--num_problems={suggested + size}" not in str(error.value)
  with pytest.raises(distributed.MeshError, match=f"--num_problems={suggested + size} or"):
    distributed.check_divides(most, mesh, "num_problems")  # without memory: both neighbours


def test_fewer_devices_are_not_suggested_where_their_shares_do_not_fit():
  estimate = memory.MemoryEstimate(0, 10, 0, 50, 70 + 6000)  # 1000 bytes a problem, fixed 70
  mesh = types.SimpleNamespace(devices=np.empty(4, object))
  fits = memory.problems_fit(estimate, 6, memory.COMPILE_HEADROOM + 70 + 2000, shared=False)
  assert fits(6, 3) and not fits(6, 2)  # 2 problems a device fit, 3 do not
  with pytest.raises(distributed.MeshError, match=r"fewer devices: --num_devices=3\.$"):
    distributed.check_divides(6, mesh, "num_problems", fits=fits)


def _cgroup_tree(root, files: dict[str, str], membership: str):
  for path, text in files.items():
    os.makedirs(os.path.dirname(root / path), exist_ok=True)
    (root / path).write_text(text)
  (root / "self_cgroup").write_text(membership)
  return str(root), str(root / "self_cgroup")


GIB = memory.GIB
V2_STAT = "anon 100\nfile 300\ninactive_file {}\nactive_file 0\n"


@pytest.mark.parametrize(
  "files, membership, want",
  [
    (  # v2: limit - (current - inactive page cache)
      {"box/memory.max": f"{2 * GIB}\n", "box/memory.current": f"{GIB}\n"}
      | {"box/memory.stat": V2_STAT.format(GIB // 4)},
      "0::/box\n",
      GIB + GIB // 4,
    ),
    (  # v2, no limit here but a tighter one on the parent
      {"a/b/memory.max": "max\n", "a/b/memory.current": "5\n", "a/memory.max": f"{GIB}\n"}
      | {"a/memory.current": f"{GIB // 2}\n"},
      "0::/a/b\n",
      GIB // 2,
    ),
    ({"box/memory.max": "max\n", "box/memory.current": f"{GIB}\n"}, "0::/box\n", None),  # v2 max
    (  # v1, the memory controller's own hierarchy
      {"memory/box/memory.limit_in_bytes": f"{3 * GIB}\n"}
      | {"memory/box/memory.usage_in_bytes": f"{GIB}\n"}
      | {"memory/box/memory.stat": f"inactive_file 7\ntotal_inactive_file {GIB}\n"}
      | {"memory/memory.limit_in_bytes": "9223372036854771712\n"},  # v1's "no limit"
      "4:memory:/box\n1:cpu:/\n",
      3 * GIB,
    ),
    (  # a container without a cgroup namespace: its own cgroup mounted at the root
      {"memory.max": f"{GIB}\n", "memory.current": "0\n"},
      "0::/system.slice/docker-abc.scope\n",
      GIB,
    ),
    ({}, "0::/\n", None),  # none: no cgroup files at all
    ({"box/memory.max": f"{GIB}\n"}, "0::/box\n", None),  # usage unreadable: unknown
    ({"box/memory.max": "1\n", "box/memory.current": f"{GIB}\n"}, "0::/box\n", 0),  # over
  ],
)
def test_cgroup_limits_are_read(files, membership, want, tmp_path):
  root, proc = _cgroup_tree(tmp_path, files, membership)
  assert cgroup.available(root, proc) == want


def test_available_memory_is_at_most_what_the_cgroup_leaves(tmp_path):
  root, _ = _cgroup_tree(tmp_path, {"memory.max": f"{GIB}\n", "memory.current": "0\n"}, "")
  assert memory.available_bytes(cgroup_root=root) <= GIB
  assert memory.available_bytes(cgroup_root=str(tmp_path / "none")) > 2**20  # the host's
