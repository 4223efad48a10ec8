"""orbax checkpoints of the train state and the data-iterator state.

Layout: <workdir>/checkpoints/<step>/{state,data}; <workdir>/model.json holds
the model shape the checkpoints were made with, checked before any work.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint.path import step as ocp_step


class CheckpointError(RuntimeError):
  pass


def check_model(workdir: str, model_cfg, write: bool = True) -> None:
  """Records the model shape in the work dir, or fails if it holds another one.

  `write=False` only checks (processes other than 0 of a multi-process run).
  """
  path = os.path.join(workdir, "model.json")
  current = dataclasses.asdict(model_cfg)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    has_ckpt = latest_step(workdir) is not None
    diff = {k: (saved.get(k), v) for k, v in current.items()
            if k in _SHAPE_KEYS and saved.get(k) != v}
    if diff and has_ckpt:
      lines = ", ".join(f"{k}: saved {a!r} vs configured {b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(
          f"work dir {workdir} holds checkpoints of a different model ({lines}); "
          "use a new --workdir, or set the config back to the saved shape to resume")
  if not write:
    return
  with open(path, "w") as f:
    json.dump(current, f, indent=1)


_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
               "pe_kind", "max_intra", "intra", "param_dtype")


def _dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_step(workdir: str) -> int | None:
  # Lists finalized step directories without a CheckpointManager: creating one
  # is a barrier that every process of a multi-process run must reach together.
  steps = ocp_step.checkpoint_steps(_dir(workdir))
  return max(steps) if steps else None


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeps the last `keep`."""

  def __init__(self, workdir: str, every: int = 1000, keep: int = 3):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True,
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(_dir(workdir), options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      logging.info("checkpoint: saving step %d (asynchronously)", step)
    return saved

  def should_save(self, step: int) -> bool:
    """True at the save cadence and when the runtime announced a preemption."""
    return self.manager.should_save(step) or self.manager.reached_preemption(step)

  def restore(self, step: int | None, abstract_state, with_data: bool = True):
    """Returns (step, state, data_state): `step`, or the newest readable one.

    With `step=None` an unreadable checkpoint (partial, truncated, corrupted)
    is moved aside to <workdir>/checkpoints_unreadable/ with a warning and the
    previous one is tried, so nothing saved is deleted and a resume continues.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {self.manager.directory}; "
                              f"saved steps: {sorted(steps)}")
      return step, *self._restore(step, abstract_state, with_data)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.manager.directory}")
    for s in steps:
      try:
        return s, *self._restore(s, abstract_state, with_data)
      except Exception as e:  # pylint: disable=broad-except
        moved = self._set_aside(s)
        logging.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s "
                        "and falling back to the previous one", s, type(e).__name__,
                        str(e).splitlines()[0][:200], moved)
        print(f"warning: checkpoint step {s} is unreadable; moved to {moved}; "
              "trying the previous checkpoint", flush=True)
    raise CheckpointError(f"no readable checkpoint in {self.manager.directory}")

  def _restore(self, step, abstract_state, with_data):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], (out["data"] if with_data else None)

  def _set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the manager's sight (process 0 moves, all wait)."""
    src = os.path.join(str(self.manager.directory), str(step))
    dst_root = os.path.join(os.path.dirname(str(self.manager.directory)), "checkpoints_unreadable")
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(dst_root, exist_ok=True)
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bipe_jax_set_aside_{step}")
    self.manager.reload()
    return dst

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
