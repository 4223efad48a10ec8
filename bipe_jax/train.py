"""Training: state creation, one jitted step, the loop, checkpoints and resume.

    bipe-train --config=configs/quickstart.py --workdir=runs/quickstart \
        [--config.pe.kind=bipe_alibi --config.train.steps=500 ...]

Starting again with the same --workdir resumes from its latest checkpoint.
`--init_from=DIR` starts a new run from DIR's parameters (bipe_jax.warm_start).
"""
from __future__ import annotations

import os
import time

from absl import flags, logging
import jax

from bipe_jax import checkpoint, cli, hostmem, metrics, sharding, stopping, warm_start
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline
from bipe_jax.trainer import Trainer, lr_schedule


class Diverged(RuntimeError):
  """A non-finite loss, gradient or update with train.on_nonfinite = "stop"."""


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`.

  Returns {"losses": {step: loss}, "step": last step, "skipped": [steps],
  "stopped_by": signal name or None}.
  """
  config_lib.validate(config)
  _prepare_workdir(workdir)
  if config.train.init_from:
    warm_start.prepare(config, workdir)
  lead = jax.process_index() == 0
  with sharding.process_zero_first("bipe_jax: work dir ready"):
    corpus = pipeline.prepare(config, workdir)
    trainer = Trainer(config, corpus.vocab_size)

  t = config.train
  ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints,
                                 clean_tmp=True)
  # Each process reads only the rows of the global batch its devices hold.
  data_iter = pipeline.train_iterator(config, corpus, **trainer.data_shard())
  if ckpt.latest_step() is not None:
    start, state, data_state = ckpt.restore(None, trainer.abstract_state())
    data_iter.set_state(sharding.own_process_state(data_state))
    print(f"resuming from step {start} in {workdir}", flush=True)
  else:
    state = trainer.init(jax.random.key(config.seed))
    if t.init_from:
      state = warm_start.load_params(trainer, state, t.init_from)
    start = 0
  if lead:  # only once the checkpoints are known to fit it: bipe-eval reads it
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=1))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"model: {n_params / 1e6:.2f}M parameters, pe.kind={config.pe.kind}, "
        f"seq_len={config.data.seq_len}, batch={t.batch_size}", flush=True)

  writer = metrics.MetricWriter(workdir, start, enabled=lead)
  key = jax.random.key(config.seed + 1)
  log = _Progress(t, start, writer)
  result = {"losses": log.losses, "step": start, "skipped": log.skipped, "stopped_by": None}
  pending = None
  # Covers the final save too: a second Ctrl-C there aborts with a message.
  with stopping.StopRequest() as stop_request:
    try:
      for step in range(start + 1, t.steps + 1):
        batch = trainer.global_batch(next(data_iter))
        state, step_metrics = trainer.step(state, batch, key)
        # Metrics are read one step late so the host never waits on the device...
        if pending is not None:
          log.record(*pending, ckpt)
        pending = (step, step_metrics)
        result["step"] = step
        stop = stop_request.reached(step)
        save = stop is not None or step == t.steps or ckpt.should_save(step)
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
          result["stopped_by"] = stop
          break
    finally:
      ckpt.close()
      writer.close()
  if result["stopped_by"] is not None:
    print(f"received {result['stopped_by']}: saved a checkpoint at step {result['step']}; "
          "run the same command again to resume", flush=True)
  else:
    print(f"training done at step {result['step']}; checkpoints in "
          f"{os.path.join(workdir, 'checkpoints')}", flush=True)
  return result


class _Progress:
  """Records per-step losses, checks finiteness, prints and logs progress lines.

  tok/s counts the tokens that carry a loss (loss mask 1) in the global batch:
  padding and masked targets are not counted.
  """

  def __init__(self, t, start: int, writer):
    self.t, self.start, self.writer = t, start, writer
    self.tokens = self.tokens_at_last = 0.0   # loss-mask tokens of this run's steps
    self.losses, self.skipped = {}, []
    self.t0 = self.t_last = time.time()
    self.first = True

  def record(self, step: int, m: dict, ckpt) -> None:
    if step in self.losses:
      return
    self.losses[step] = float(m["loss"])
    self.tokens += float(m["tokens"])
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
    rate = (self.tokens - self.tokens_at_last) / max(now - self.t_last, 1e-9)
    eta = (now - self.t0) / max(step - self.start, 1) * (self.t.steps - step)
    # optax counts updates from 0: step `step` was update number step - 1.
    loss, lr = self.losses[step], float(lr_schedule(self.t)(step - 1))
    print(f"step {step}/{self.t.steps} | loss {loss:.4f} | {rate:,.0f} tok/s | lr {lr:.2e} "
          f"| elapsed {metrics.format_duration(now - self.t0)} | eta {metrics.format_duration(eta)}"
          + (" (includes compilation)" if self.first else ""), flush=True)
    self.writer.write(step, {"train/loss": loss, "train/tokens_per_s": rate, "train/lr": lr,
                             "train/grad_norm": self.grad_norm,
                             "train/skipped_updates": len(self.skipped)})
    self.first, self.t_last, self.tokens_at_last = False, now, self.tokens


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f"cannot create --workdir {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK):
    raise config_lib.ConfigError(f"--workdir {workdir} is not writable; choose another directory")


def define_flags() -> None:
  """CLI flags; defined only when run as a program, so importing stays side-effect free."""
  flags.DEFINE_string("config", None, "Config file, e.g. configs/quickstart.py; change "
                      "any of its values with --config.KEY=VALUE (e.g. --config.train.steps=500).")
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and caches.")
  flags.DEFINE_string("init_from", None, "Start from the parameters of this work dir's "
                      "latest checkpoint (fresh optimizer, step 0); same as "
                      "--config.train.init_from.")
  sharding.define_flags()


def main(overrides) -> None:
  f = flags.FLAGS
  cli.required("--config=configs/quickstart.py --workdir=runs/quickstart",
               config=f.config, workdir=f.workdir)
  if f.init_from is not None:
    if any(key == "train.init_from" for key, _ in overrides):
      raise config_lib.ConfigError("--init_from and --config.train.init_from set the same "
                                   "thing; pass one")
    overrides = [*overrides, ("train.init_from", f.init_from)]
  config = cli.apply_overrides(config_lib.load_file(f.config), overrides)
  sharding.initialize_from_flags()
  train(config, f.workdir)


def run(argv=None) -> None:
  """Console entry point `bipe-train`."""
  hostmem.retain_freed_memory()   # before JAX starts its threads: steps stop page-faulting
  cli.run(main, define_flags, argv, errors=(Diverged,))


if __name__ == "__main__":
  run()
