"""Meshes, logical rules and sharded training on 8 fake CPU devices.

The multi-device runs happen once, in a subprocess (tests/multidevice_checks.py)
because the device count is fixed when jax starts and the rest of the suite
keeps 1 device; the tests here assert on what it reports. Mesh parsing and the
batch layout are checked in-process.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bipe_jax import sharding, trainer
from bipe_jax import config as config_lib
from tiny import REPO, cli_args, tiny_config

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2")


def _subprocess_env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  root = tmp_path_factory.mktemp("multidevice")
  out = root / "report.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "multidevice_checks.py"), str(out),
       str(root / "work"), str(root / "cache")],
      capture_output=True, text=True, timeout=900, env=_subprocess_env(), cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return json.loads(out.read_text())


# What the default rules must produce: per-device shard shapes of each watched
# parameter, written out by hand from (vocab 320, embed 64, heads 4, kv_heads
# 2, head_dim 16, mlp 128). data only replicates; fsdp splits embed; tensor
# splits vocab, heads, kv_heads and mlp.
EXPECTED_SHARDS = {
    "data=8": dict(embed=[320, 64], lm_head=[64, 320], q=[64, 4, 16], k=[64, 2, 16],
                   o=[4, 16, 64], gate=[64, 128], down=[128, 64], norm=[64]),
    "fsdp=8": dict(embed=[320, 8], lm_head=[8, 320], q=[8, 4, 16], k=[8, 2, 16],
                   o=[4, 16, 8], gate=[8, 128], down=[128, 8], norm=[8]),
    "data=2,fsdp=2,tensor=2": dict(embed=[160, 32], lm_head=[32, 160], q=[32, 2, 16],
                                   k=[32, 1, 16], o=[2, 16, 32], gate=[32, 64],
                                   down=[64, 32], norm=[32]),
}


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_reproduces_one_device_losses(report, shape):
  run = report["meshes"][shape]
  assert report["devices"] == 8
  assert int(np.prod(list(run["mesh"].values()))) == 8
  np.testing.assert_allclose(run["losses"], report["losses_1"], rtol=2e-5, err_msg=(
      f"5 steps on mesh {shape} must give the 1-device losses: the same global "
      "batch and the same math, only laid out differently"))


@pytest.mark.parametrize("shape", MESHES)
def test_params_and_adam_moments_are_sharded_by_the_rules(report, shape):
  run = report["meshes"][shape]
  assert run["params"] == EXPECTED_SHARDS[shape], "per-device parameter shards"
  assert run["mu"] == EXPECTED_SHARDS[shape], "Adam moments live where their parameters do"


def test_checkpoint_restores_onto_other_meshes(report):
  trained = report["meshes"]["fsdp=8"]["eval_nll"]
  one = report["restored"]["one_device"]
  assert one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  tp = report["restored"]["data=2,tensor=4"]
  assert tp["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
  for r in (one, tp):
    assert r["step"] == 5 and r["params_equal"], "restored values must be the saved ones"
    assert r["eval_nll"] == pytest.approx(trained, rel=2e-6)
  assert one["params"] == EXPECTED_SHARDS["data=8"], "one device holds whole arrays"
  # tensor=4 splits vocab, heads and mlp; 2 kv heads do not divide 4, so k is replicated.
  assert tp["params"] == dict(embed=[80, 64], lm_head=[64, 80], q=[64, 1, 16], k=[64, 2, 16],
                              o=[1, 16, 64], gate=[64, 32], down=[32, 64], norm=[64])


def test_grad_accumulation_matches_one_large_batch(report):
  acc = report["accum"]
  np.testing.assert_allclose(acc["losses_4"], acc["losses_1"], rtol=2e-6)
  assert acc["max_param_diff"] < 1e-6, "4 micro-batches of 8 must update like 1 batch of 32"


def test_bf16_compute_keeps_fp32_params_and_optimizer_state(report):
  bf = report["bf16"]
  assert bf["bf16_dots"] > 0, "the step must compute in bfloat16"
  assert bf["param_dtypes"] == ["float32"] and bf["mu_dtypes"] == ["float32"]
  np.testing.assert_allclose(bf["losses"], report["losses_1"][:2], atol=0.02)


def test_remat_recomputes_and_changes_nothing(report):
  assert report["remat"]["full"]["remat_in_jaxpr"]
  assert report["remat"]["dots_no_batch"]["remat_in_jaxpr"]
  np.testing.assert_allclose(report["remat"]["full"]["losses"], report["losses_1"][:2],
                             rtol=2e-5)


def test_bad_mesh_or_batch_fails_naming_both_numbers(report):
  assert report["error_mesh"].startswith("mesh.shape='data=3' covers 3 devices, but there are 8")
  assert "covers 4 devices, but there are 8" in report["error_mesh_fixed"]
  assert report["error_batch"].startswith(
      "train.batch_size=12 is not divisible by the 8 data-parallel devices (mesh data=8 x fsdp=1)")
  assert "= 32 / 8 = 4 is not divisible by the 8 data-parallel devices" in report["error_micro"]


def test_cli_fails_at_start_when_mesh_does_not_divide_devices(tmp_path):
  c = tiny_config()
  env = _subprocess_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  proc = subprocess.run(
      [sys.executable, "-m", "bipe_jax.train", *cli_args(c), f"--workdir={tmp_path}/w",
       "--config.mesh.shape=data=2,fsdp=-1,tensor=3"],
      capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert ("error: mesh.shape='data=2,fsdp=-1,tensor=3' needs a multiple of 6 devices, "
          "but there are 8") in proc.stderr
  assert not os.path.exists(tmp_path / "w"), "nothing may be written before the check"


# In-process: parsing and layout, no compilation.

@pytest.mark.parametrize("spec,n,sizes", [
    ("data=-1,fsdp=1,tensor=1", 8, (8, 1, 1)),
    ("fsdp=8", 16, (2, 8, 1)),             # data takes the rest when unnamed
    ("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)),
    ("tensor=4,fsdp=-1", 8, (1, 2, 4)),     # an explicit -1 wins over data
    ({"data": 2, "tensor": -1}, 8, (2, 1, 4)),
    ("", 4, (4, 1, 1)),
])
def test_mesh_shape_resolves(spec, n, sizes):
  assert sharding.resolve_shape(sharding.parse_shape(spec), n) == sizes


@pytest.mark.parametrize("spec,message", [
    ("data=2,model=4", "unknown mesh axis 'model'; axes: data, fsdp, tensor"),
    ("data=-1,fsdp=-1", "at most one axis may be -1"),
    ("data:2", "'data:2' is not AXIS=SIZE"),
    ("fsdp=two", "size of 'fsdp' must be an integer, got 'two'"),
    ("tensor=0", "size of 'tensor' must be positive or -1, got 0"),
])
def test_bad_mesh_shape_names_the_problem(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.parse_shape(spec)


def test_default_config_is_one_device_all_data():
  c = tiny_config()
  config_lib.validate(c)
  mesh = sharding.make_mesh(c)
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_survive_the_json_round_trip():
  # config.json stores tuples as lists; evaluation reads it back.
  c = tiny_config()
  c.mesh.rules = json.loads(json.dumps(c.mesh.rules))
  rules = sharding.rules(c)
  assert ("batch", ("data", "fsdp")) in rules and ("head_dim", None) in rules
  assert sharding.batch_axes(rules) == ("data", "fsdp")
  c.mesh.rules = (("embed", "model"),)
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    sharding.rules(c)


def test_micro_batches_are_strided_so_rows_stay_on_their_device():
  x = np.arange(16).reshape(16, 1)
  micro = trainer.micro_batches({"x": x}, 4)["x"]
  assert micro.shape == (4, 4, 1)
  # With 4 devices holding rows 0-3, 4-7, ...: micro-batch j takes row j of each.
  assert micro[:, :, 0].tolist() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14],
                                     [3, 7, 11, 15]]


def test_single_process_loads_the_whole_batch():
  c = tiny_config()
  mesh = sharding.make_mesh(c)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  assert sharding.process_rows(spec, 8) == (0, 1)


def test_distributed_flags_go_together():
  with pytest.raises(ValueError, match="go together"):
    sharding.initialize_distributed(coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match="--process_id=2 must be below --num_processes=2"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, 2)
  assert sharding.initialize_distributed(mode="no") is False


def test_slurm_step_starts_jax_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  for k, v in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="gpu[1-2]", SLURM_NTASKS="16",
                   SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8").items():
    monkeypatch.setenv(k, v)
  assert sharding.initialize_distributed() is True
  assert calls[-1] == ((), {}), "one task per GPU: jax's own SLURM detection does the rest"
  # One task per node must drive all of the node's GPUs, not only GPU <local id>.
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
  sharding.initialize_distributed()
  assert calls[-1] == ((), {"local_device_ids": list(range(8))})
  # sbatch's own shell (no srun step) is not a multi-process run.
  monkeypatch.delenv("SLURM_STEP_NODELIST")
  n = len(calls)
  if not sharding._tpu_chips():  # pylint: disable=protected-access
    assert sharding.initialize_distributed() is False and len(calls) == n


@pytest.mark.parametrize("script", ["tpu_pod.sh", "tpu_queued_resource.sh",
                                    "xpk_multislice.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_parse_and_print_usage(script):
  path = os.path.join(REPO, "launch", script)
  assert subprocess.run(["bash", "-n", path]).returncode == 0
  if script.endswith(".sh"):
    proc = subprocess.run(["bash", path], capture_output=True, text=True)
    assert proc.returncode == 2 and "--config=configs/" in proc.stdout


def test_dcn_shape_counts_slices():
  c = tiny_config()
  c.mesh.dcn_shape = "data=2"
  with pytest.raises(ValueError, match=r"mesh.dcn_shape='data=2' covers 2 slices, but there are 1"):
    sharding.mesh_sizes(c)
  c.mesh.dcn_shape = "data=-1"
  assert sharding.mesh_sizes(c) == ((jax.device_count(), 1, 1), (1, 1, 1))
