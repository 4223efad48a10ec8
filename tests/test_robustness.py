"""Preemption, Ctrl-C, kill -9, damaged or mismatched checkpoints and divergence (subprocess runs of bipe-train)."""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from bipe_jax import checkpoint, train
from bipe_jax.trainer import Trainer
from tiny import REPO, cli_args, tiny_config


def _config(steps):
  c = tiny_config(steps=steps)
  c.train.log_every = 1        # every step's loss lands in metrics.jsonl
  c.train.checkpoint_every = 25
  return c


def _start(config, workdir):
  return subprocess.Popen([sys.executable, "-m", "bipe_jax.train", *cli_args(config),
                           f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows}


def _wait_for_checkpoint(workdir, proc, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if checkpoint.latest_step(workdir):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  proc = _start(_config(300), workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return workdir, _losses(workdir)


def _wait_for_checkpoint_after(workdir, proc, step, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if (checkpoint.latest_step(workdir) or 0) > step:
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint after step {step} appeared")


def _tb_losses(workdir):
  """(step, loss) of every train/loss event in every event file, as TensorBoard loads them."""
  tb = os.path.join(workdir, "tb")
  return [(e.step, v.tensor.float_val[0])
          for f in sorted(os.listdir(tb))
          for e in EventFileLoader(os.path.join(tb, f)).Load()
          for v in e.summary.value if v.tag == "train/loss"]


def test_ctrl_c_then_kill9_then_resume_log_each_step_once_like_uninterrupted(uninterrupted, tmp_path):
  _, full = uninterrupted
  workdir = str(tmp_path / "stopped")
  # 1. Ctrl-C after the first checkpoint: a checkpoint at the current step, exit 0.
  proc = _start(_config(300), workdir)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
  line = [l for l in out.splitlines() if l.startswith("received SIGINT: saved a checkpoint")]
  assert len(line) == 1, out
  interrupted = int(line[0].split("at step ")[1].split(";")[0])
  assert interrupted < 300 and checkpoint.latest_step(workdir) == interrupted
  assert interrupted % 25 != 0 or interrupted > 25, "checkpoint at the current step, not the cadence"
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")), "unfinished save left behind"
  assert max(_losses(workdir)) == interrupted
  # 2. Resume, then kill -9 past a later checkpoint: metrics.jsonl and tb/
  #    now hold steps the next resume repeats.
  proc = _start(_config(300), workdir)
  _wait_for_checkpoint_after(workdir, proc, interrupted)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed = checkpoint.latest_step(workdir)
  assert interrupted < killed < 300
  # 3. Resume to the end.
  proc = _start(_config(300), workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert f"resuming from step {killed}" in out
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 301)), "each step logged exactly once"
  # Bitwise: steps interrupted+1.. come from the run resumed after Ctrl-C,
  # steps killed+1.. from the run resumed after kill -9.
  assert [r["train/loss"] for r in rows] == [full[s] for s in range(1, 301)], \
      "losses of the stopped and resumed runs differ from the uninterrupted run's"
  tb = _tb_losses(workdir)
  assert [s for s, _ in tb] == list(range(1, 301)), "TensorBoard shows one value per step"
  np.testing.assert_array_equal([v for _, v in tb],
                                np.float32([r["train/loss"] for r in rows]))


def _hashes(root):
  return {os.path.relpath(os.path.join(r, f), root):
          hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
          for r, _, fs in os.walk(root) for f in fs}


def test_shape_change_fails_naming_arrays_and_moves_nothing(uninterrupted, tmp_path):
  src, _ = uninterrupted
  workdir = str(tmp_path / "reshaped")
  shutil.copytree(src, workdir)
  before = _hashes(os.path.join(workdir, "checkpoints"))
  config_before = open(os.path.join(workdir, "config.json")).read()
  expected = "params/layer_0/mlp/up/kernel: saved (64, 128) vs configured (64, 256)"
  config = _config(300)
  config.model.d_ff = 256
  proc = _start(config, workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert expected in out and "Traceback" not in out, out
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  # bipe-eval of the same work dir, its config.json edited to the other shape.
  saved = json.loads(config_before)
  saved["model"]["d_ff"] = 256
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  proc = subprocess.run([sys.executable, "-m", "bipe_jax.evaluate", f"--workdir={workdir}",
                         "--lengths=32"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert _hashes(os.path.join(workdir, "checkpoints")) == before, "checkpoints must stay untouched"
  assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))


def test_memory_error_during_restore_is_raised_and_moves_nothing(uninterrupted, tmp_path, monkeypatch):
  src, _ = uninterrupted
  workdir = str(tmp_path / "oom")
  shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(workdir, "checkpoints"))
  before = _hashes(workdir)

  def out_of_memory(*args, **kwargs):
    raise MemoryError("restore needs more host memory")
  monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
  trainer = Trainer(_config(300), vocab_size=320)
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(MemoryError):
    ckpt.restore(None, trainer.abstract_state())
  ckpt.close()
  assert _hashes(workdir) == before


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "term")
  proc = _start(_config(100_000), workdir)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  line = [l for l in out.splitlines() if l.startswith("received SIGTERM")]
  assert line, out
  step = int(line[0].split("at step ")[1].split(";")[0])
  assert checkpoint.latest_step(workdir) == step
  assert step % 25 != 0 or step > 25, "checkpoint must be at the current step, not the cadence"
  assert max(_losses(workdir)) == step


def test_truncated_latest_checkpoint_falls_back_with_warning(uninterrupted, tmp_path, capsys):
  src, _ = uninterrupted
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(src, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  latest = steps[-1]
  state_dir = os.path.join(workdir, "checkpoints", str(latest), "state")
  files = sorted((os.path.getsize(os.path.join(r, f)), os.path.join(r, f))
                 for r, _, fs in os.walk(state_dir) for f in fs)
  for _, path in files[-3:]:   # the largest files: array data
    with open(path, "r+b") as f:
      f.truncate(max(os.path.getsize(path) // 3, 1))
  config = _config(300)
  config.train.steps = 310
  out = train.train(config, workdir)
  printed = capsys.readouterr().out
  assert f"checkpoint step {latest} is unreadable" in printed
  assert f"resuming from step {steps[-2]}" in printed
  assert min(out["losses"]) == steps[-2] + 1
  assert os.listdir(os.path.join(workdir, "checkpoints_unreadable")), "bad checkpoint kept aside"


def test_divergence_stops_with_step_and_last_good_checkpoint(tmp_path):
  config = _config(60)
  workdir = str(tmp_path / "nan")
  train.train(config, workdir)   # a good run to step 60, checkpoints 25, 50, 60
  config.train.steps = 120
  config.train.lr = 1e30
  config.train.warmup_steps = 0
  with pytest.raises(train.Diverged, match=r"non-finite loss or gradient at step 6\d .*"
                     r"last good checkpoint: step (60|75)"):
    train.train(config, workdir)
  from bipe_jax import evaluate
  cfg = evaluate.load_config(workdir)
  from bipe_jax.data import pipeline
  corpus = pipeline.prepare(cfg, workdir)
  _, state = evaluate.restore_params(cfg, workdir, corpus.vocab_size)
  import jax
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)), "saved state must be finite"


def test_skip_mode_counts_and_keeps_state_finite(tmp_path):
  config = _config(12)
  config.train.lr = 1e30
  config.train.warmup_steps = 0
  config.train.on_nonfinite = "skip"
  out = train.train(config, str(tmp_path / "skip"))
  assert out["skipped"], "updates at an absurd lr must be skipped"
  assert out["step"] == 12
