"""Training: state creation, one jitted step, the loop, checkpoints and resume.

    bipe-train --config=configs/quickstart.py --workdir=runs/quickstart \
        [--config.pe.kind=bipe_alibi --config.train.steps=500 ...]

Starting again with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from bipe_jax import checkpoint, metrics
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline
from bipe_jax.trainer import Trainer, lr_schedule


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns {"losses": {step: loss}, "step": last}."""
  config_lib.validate(config)
  _prepare_workdir(workdir)
  corpus = pipeline.prepare(config, workdir)
  trainer = Trainer(config, corpus.vocab_size)
  checkpoint.check_model(workdir, trainer.model_cfg)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))

  t = config.train
  ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
  data_iter = pipeline.train_iterator(config, corpus)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, trainer.abstract_state())
    data_iter.set_state(data_state)
    logging.info("resuming from checkpoint at step %d", start)
    print(f"resuming from step {start} in {workdir}", flush=True)
  else:
    state = trainer.init(jax.random.key(config.seed))
    start = 0
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"model: {n_params / 1e6:.2f}M parameters, pe.kind={config.pe.kind}, "
        f"seq_len={config.data.seq_len}, batch={t.batch_size}", flush=True)

  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
  key = jax.random.key(config.seed + 1)
  tokens_per_step = t.batch_size * config.data.seq_len
  losses, pending = {}, None
  t0 = t_log = time.time()
  steps_since_log, first_logged = 0, False
  try:
    for step in range(start + 1, t.steps + 1):
      batch = next(data_iter)
      state, step_metrics = trainer.step(state, batch, key)
      # Metrics are read one step late so the host never waits on the device.
      if pending is not None:
        _record(losses, pending)
      pending = (step, step_metrics)
      steps_since_log += 1
      ckpt.save(step, state, data_iter.get_state())
      if step % t.log_every == 0 or step == t.steps:
        _record(losses, pending)
        now = time.time()
        rate = steps_since_log * tokens_per_step / max(now - t_log, 1e-9)
        done = step - start
        eta = (now - t0) / done * (t.steps - step)
        loss = losses[step]
        lr = float(lr_schedule(t)(step))
        print(f"step {step}/{t.steps} | loss {loss:.4f} | {rate:,.0f} tok/s | lr {lr:.2e} "
              f"| elapsed {metrics.format_duration(now - t0)} | eta {metrics.format_duration(eta)}"
              + ("" if first_logged else " (includes compilation)"), flush=True)
        writer.write(step, {"train/loss": loss, "train/tokens_per_s": rate, "train/lr": lr,
                            "train/grad_norm": float(pending[1]["grad_norm"])})
        first_logged, t_log, steps_since_log = True, now, 0
    if pending is not None:
      _record(losses, pending)
    final = int(state.step)
    ckpt.save(final, state, data_iter.get_state(), force=final not in ckpt.manager.all_steps())
  finally:
    ckpt.close()
    writer.close()
  print(f"training done at step {final}; checkpoints in {os.path.join(workdir, 'checkpoints')}",
        flush=True)
  return {"losses": losses, "step": final}


def _record(losses: dict, pending) -> None:
  step, m = pending
  if step not in losses:
    losses[step] = float(m["loss"])


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f"cannot create --workdir {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK):
    raise config_lib.ConfigError(f"--workdir {workdir} is not writable; choose another directory")


def define_flags() -> None:
  """CLI flags; defined only when run as a program, so importing stays side-effect free."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/quickstart.py.")
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and caches.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
    raise app.UsageError("both --config=FILE and --workdir=DIR are required")
  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (config_lib.ConfigError, checkpoint.CheckpointError, ValueError, OSError) as e:
    config_lib.fail(e)


def run() -> None:
  """Console entry point `bipe-train`."""
  try:
    config_lib.check_overrides(sys.argv[1:])
  except config_lib.ConfigError as e:
    config_lib.fail(e)
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
