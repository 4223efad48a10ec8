"""Preemption, kill -9, corrupted checkpoints and divergence (subprocess runs of bipe-train)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bipe_jax import checkpoint, train
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


def test_kill9_then_restart_reproduces_uninterrupted_losses(uninterrupted, tmp_path):
  _, full = uninterrupted
  workdir = str(tmp_path / "killed")
  proc = _start(_config(300), workdir)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = checkpoint.latest_step(workdir)
  assert resumed_from is not None and resumed_from < 300
  proc = _start(_config(300), workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert f"resuming from step {resumed_from}" in out
  # metrics.jsonl holds both runs; the restart's lines are the last ones per step.
  after = _losses(workdir)
  steps = range(resumed_from + 1, 301)
  assert [after[s] for s in steps] == [full[s] for s in steps], "losses after restart differ"


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
  import shutil
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
  out = train.train(config, workdir)   # a good run to step 60, checkpoints 25, 50, 60
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
