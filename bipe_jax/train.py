"""Training: state creation, one jitted step, the loop, checkpoints and resume.

    bipe-train --config=configs/quickstart.py --workdir=runs/quickstart \
        [--config.pe.kind=bipe_alibi --config.train.steps=500 ...]

Starting again with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from bipe_jax import checkpoint, metrics, sharding
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline
from bipe_jax.trainer import Trainer, lr_schedule


class Diverged(RuntimeError):
  """A non-finite loss, gradient or update with train.on_nonfinite = "stop"."""


class _SignalFlag:
  """Turns SIGTERM (preemption, scancel, kill) into a request to checkpoint and stop."""

  def __init__(self):
    self.received = None
    self._old = None

  def __enter__(self):
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old)


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`.

  Returns {"losses": {step: loss}, "step": last step, "skipped": [steps],
  "stopped_by": signal name or None}.
  """
  config_lib.validate(config)
  _prepare_workdir(workdir)
  lead = jax.process_index() == 0
  with sharding.process_zero_first("bipe_jax: work dir ready"):
    corpus = pipeline.prepare(config, workdir)
    trainer = Trainer(config, corpus.vocab_size)
    checkpoint.check_model(workdir, trainer.model_cfg, write=lead)
    if lead:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))

  t = config.train
  ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
  # Each process reads only the rows of the global batch its devices hold.
  data_iter = pipeline.train_iterator(config, corpus, **trainer.data_shard())
  if ckpt.latest_step() is not None:
    start, state, data_state = ckpt.restore(None, trainer.abstract_state())
    data_iter.set_state(sharding.own_process_state(data_state))
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
  log = _Progress(t, config.data.seq_len, start, writer)
  result = {"losses": log.losses, "step": start, "skipped": log.skipped, "stopped_by": None}
  pending = None
  try:
    with _SignalFlag() as signals:
      for step in range(start + 1, t.steps + 1):
        batch = trainer.global_batch(next(data_iter))
        state, step_metrics = trainer.step(state, batch, key)
        # Metrics are read one step late so the host never waits on the device...
        if pending is not None:
          log.record(*pending, ckpt)
        pending = (step, step_metrics)
        result["step"] = step
        stop = signals.received is not None
        save = stop or step == t.steps or ckpt.should_save(step)
        if save or step % t.log_every == 0:
          # ...except before a save (a non-finite state is never written) and
          # on log steps.
          log.record(*pending, ckpt)
          pending = None
          if save:
            ckpt.save(step, state, sharding.gather_process_states(data_iter.get_state()),
                      force=True)
          if step % t.log_every == 0 or step == t.steps or stop:
            log.print_line(step)
        if stop:
          result["stopped_by"] = signals.received
          print(f"received {signals.received}: saved a checkpoint at step {step}; "
                "run the same command again to resume", flush=True)
          break
  finally:
    ckpt.close()
    writer.close()
  if result["stopped_by"] is None:
    print(f"training done at step {result['step']}; checkpoints in "
          f"{os.path.join(workdir, 'checkpoints')}", flush=True)
  return result


class _Progress:
  """Records per-step losses, checks finiteness, prints and logs progress lines."""

  def __init__(self, t, seq_len: int, start: int, writer):
    self.t, self.start, self.writer = t, start, writer
    self.tokens_per_step = t.batch_size * seq_len
    self.losses, self.skipped = {}, []
    self.t0 = self.t_last = time.time()
    self.last_step, self.first = start, True

  def record(self, step: int, m: dict, ckpt) -> None:
    if step in self.losses:
      return
    self.losses[step] = float(m["loss"])
    self.grad_norm = float(m["grad_norm"])
    if bool(m["finite"]):
      return
    if self.t.on_nonfinite == "skip":
      self.skipped.append(step)
      logging.warning("non-finite loss/gradient at step %d: update skipped (%d so far)",
                      step, len(self.skipped))
      return
    good = ckpt.latest_step()
    raise Diverged(
        f"non-finite loss or gradient at step {step} (loss={self.losses[step]}); "
        f"last good checkpoint: {'step ' + str(good) if good is not None else 'none'}. "
        "Lower train.lr, or set train.on_nonfinite=skip to skip such updates")

  def print_line(self, step: int) -> None:
    now = time.time()
    rate = (step - self.last_step) * self.tokens_per_step / max(now - self.t_last, 1e-9)
    eta = (now - self.t0) / max(step - self.start, 1) * (self.t.steps - step)
    loss, lr = self.losses[step], float(lr_schedule(self.t)(step))
    print(f"step {step}/{self.t.steps} | loss {loss:.4f} | {rate:,.0f} tok/s | lr {lr:.2e} "
          f"| elapsed {metrics.format_duration(now - self.t0)} | eta {metrics.format_duration(eta)}"
          + (" (includes compilation)" if self.first else ""), flush=True)
    self.writer.write(step, {"train/loss": loss, "train/tokens_per_s": rate, "train/lr": lr,
                             "train/grad_norm": self.grad_norm,
                             "train/skipped_updates": len(self.skipped)})
    self.first, self.t_last, self.last_step = False, now, step


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
  sharding.define_flags()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
    raise app.UsageError("both --config=FILE and --workdir=DIR are required")
  try:
    sharding.initialize_from_flags()
    train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (config_lib.ConfigError, checkpoint.CheckpointError, Diverged, ValueError, OSError) as e:
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
