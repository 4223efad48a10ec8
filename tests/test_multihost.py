"""Two cooperating processes on localhost (2 fake CPU devices each), via launch/local.py.

jax.distributed with a 127.0.0.1 coordinator and gloo collectives: the same
multi-controller runtime a TPU pod or GPU cluster uses, one machine standing
in for two hosts.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bipe_jax import checkpoint
from tiny import REPO, cli_args, tiny_config

STEPS = 4


def _env() -> dict:
  # Cheaper compiles (see multidevice_checks.py); every run here uses the same flags.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  return env


def _run(cmd, timeout=420):
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                        env=_env())
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
  return proc.stdout


def _launch(module, args):
  return _run([sys.executable, os.path.join(REPO, "launch", "local.py"), "--num_processes=2",
               "--cpu_devices=2", f"--module={module}", "--", *args])


def _config(cache_dir):
  c = tiny_config(steps=STEPS)
  c.data.cache_dir = cache_dir
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  return c


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["step"] for r in rows], [r["train/loss"] for r in rows]


def _nll(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    return [r["nll"] for r in json.load(f)["results"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  cache = str(root / "cache")
  args = cli_args(_config(cache))
  single = str(root / "single")
  _run([sys.executable, "-m", "bipe_jax.train", *args, f"--workdir={single}"])
  multi = str(root / "multi")
  # Parameters sharded across the two processes too; the single-process
  # evaluation below must then fall back to a mesh that fits its 1 device.
  out = _launch("bipe_jax.train", [*args, f"--workdir={multi}",
                                   "--config.mesh.shape=data=2,fsdp=2"])
  _launch("bipe_jax.evaluate", [f"--workdir={multi}", "--lengths=32,64"])
  multi_nll = _nll(multi)
  _run([sys.executable, "-m", "bipe_jax.evaluate", f"--workdir={multi}", "--lengths=32,64"])
  return dict(single=single, multi=multi, train_out=out, multi_nll=multi_nll,
              single_nll=_nll(multi), cache=cache)


def test_two_processes_train_like_one(runs):
  out = runs["train_out"]
  assert "[0] training done at step 4" in out and "[1] training done at step 4" in out
  steps, multi = _losses(runs["multi"])
  assert steps == list(range(1, STEPS + 1)), "only process 0 writes logs, each step once"
  _, single = _losses(runs["single"])
  np.testing.assert_allclose(multi, single, rtol=2e-5, err_msg=(
      "2 processes x 2 devices, each loading its half of every global batch, must "
      "reproduce the single-device losses"))


def test_all_processes_wrote_one_checkpoint(runs):
  steps = sorted(int(s) for s in os.listdir(os.path.join(runs["multi"], "checkpoints"))
                 if s.isdigit())
  assert steps[-1] == STEPS and 2 in steps


def test_single_process_restores_and_evaluates_to_the_same_loss(runs):
  # Saved from a data=2,fsdp=2 mesh over 2 processes, restored onto 1 device.
  np.testing.assert_allclose(runs["single_nll"], runs["multi_nll"], rtol=1e-5)
  assert len(runs["single_nll"]) == 2


def test_two_processes_resume_where_they_stopped(runs, tmp_path):
  # Document packing: each process's iterator position is its own, so the
  # checkpoint must carry both and each process must get its own back.
  c = _config(runs["cache"])
  c.data.packing = "documents"
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  _launch("bipe_jax.train", [*cli_args(c), f"--workdir={full}"])
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, "checkpoints", str(STEPS)))
  out = _launch("bipe_jax.train", [*cli_args(c), f"--workdir={part}"])
  assert "[0] resuming from step 2" in out and "[1] resuming from step 2" in out
  steps, losses = _losses(part)
  assert steps == [1, 2, 3, 4], "the resumed run replaces the rows of steps 3 and 4"
  np.testing.assert_allclose(losses[2:], _losses(full)[1][2:], rtol=1e-6)


def test_launcher_stops_everyone_when_one_process_fails(tmp_path):
  # An unknown pe.kind fails validation in every process: the launcher must
  # return the failure rather than hang.
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num_processes=2",
       "--cpu_devices=1", "--", *cli_args(tiny_config()), f"--workdir={tmp_path}/w",
       "--config.pe.kind=nope"],
      capture_output=True, text=True, cwd=REPO, timeout=120, env=_env())
  assert proc.returncode == 2, proc.stdout[-3000:]
  assert "invalid pe.kind='nope'" in proc.stdout


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  # Started directly (not through the launcher) to signal one process only.
  c = _config(str(tmp_path / "cache"))
  c.train.steps = 100_000
  c.train.checkpoint_every = 100_000   # the only checkpoint is the one the signal asks for
  workdir = str(tmp_path / "w")
  port = socket.socket()
  port.bind(("127.0.0.1", 0))
  address = f"127.0.0.1:{port.getsockname()[1]}"
  port.close()
  env = dict(_env(), PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, "-m", "bipe_jax.train", *cli_args(c),
                             f"--workdir={workdir}", f"--coordinator_address={address}",
                             "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
      assert time.time() - t0 < 300 and all(p.poll() is None for p in procs), "no training steps"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  stopped = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    line = [l for l in out.splitlines() if l.startswith("received SIGTERM: saved a checkpoint")]
    assert len(line) == 1, out[-4000:]
    stopped.append(int(line[0].split("at step ")[1].split(";")[0]))
  assert stopped[0] == stopped[1], f"processes stopped at different steps: {stopped}"
  assert checkpoint.latest_step(workdir) == stopped[0]
