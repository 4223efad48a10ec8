"""orbax checkpoints of the train state and the data-iterator state.

Layout: <workdir>/checkpoints/<step>/{state,data}. Before restoring, the
array shapes recorded in a checkpoint's metadata are compared with the train
state the config builds; a difference is a config error and touches nothing.
Only a checkpoint whose files are provably damaged is moved aside.
"""
from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.path import step as ocp_step


class CheckpointError(RuntimeError):
  pass


class ShapeMismatch(CheckpointError):
  """The config builds arrays of other shapes (or other arrays) than a checkpoint holds.

  `diffs`: one 'name: saved S vs configured C' line per array (shape_differences).
  """

  def __init__(self, message: str, diffs=()):
    super().__init__(message)
    self.diffs = list(diffs)


class Damaged(CheckpointError):
  """A checkpoint's files are missing, truncated or unreadable."""


# TensorStore reports unreadable bytes with these absl status codes (as ValueError).
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")


def _chain(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def is_damage(e: BaseException) -> bool:
  """True when `e` (or what it wraps) says a checkpoint file is missing or unreadable.

  orbax wraps every array-read failure in a bare Exception, so the cause chain
  decides: a memory or runtime error anywhere in it is never damage.
  """
  chain = list(_chain(e))
  if any(isinstance(x, (MemoryError, jax.errors.JaxRuntimeError)) for x in chain):
    return False
  return any(isinstance(x, (Damaged, FileNotFoundError, EOFError, json.JSONDecodeError,
                            UnicodeDecodeError))
             or (isinstance(x, ValueError) and str(x).split(":")[0] in _DAMAGE_CODES)
             for x in chain)


def _dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_step(workdir: str) -> int | None:
  # Lists finalized step directories without a CheckpointManager: creating one
  # is a barrier that every process of a multi-process run must reach together.
  steps = ocp_step.checkpoint_steps(_dir(workdir))
  return max(steps) if steps else None


def _path_name(path) -> str:
  """A key path as 'params/layer_0/attn/q/kernel', the same for a TrainState and its metadata."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
  return {_path_name(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_differences(abstract_state, saved_metadata) -> list[str]:
  """'name: saved S vs configured C' for each array that differs, in state order."""
  want, have = _shapes(abstract_state), _shapes(saved_metadata)
  diffs = [f"{k}: saved {have[k]} vs configured {v}" for k, v in want.items()
           if k in have and have[k] != v]
  diffs += [f"{k}: not in the checkpoint (configured {v})" for k, v in want.items()
            if k not in have]
  diffs += [f"{k}: saved {v}, not in this config" for k, v in have.items() if k not in want]
  return diffs


def format_diffs(diffs: list[str], shown: int = 6) -> str:
  """The first `shown` shape differences, joined, with how many more there are."""
  more = len(diffs) - shown
  return "; ".join(diffs[:shown]) + (f"; and {more} more" if more > 0 else "")


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeps the last `keep`.

  `clean_tmp` deletes unfinished saves (`*.orbax-checkpoint-tmp*`) left by a
  killed run; only the run that writes checkpoints may do so, never a reader.
  """

  def __init__(self, workdir: str, every: int = 1000, keep: int = 3, clean_tmp: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=clean_tmp)
    # Handlers named up front so a step's metadata can be read before any restore.
    self.manager = ocp.CheckpointManager(
        _dir(workdir), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

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
    return self.manager.should_save(step)

  def restore(self, step: int | None, abstract_state, with_data: bool = True):
    """Returns (step, state, data_state): `step`, or the newest readable one.

    Raises ShapeMismatch, moving nothing, when the config builds other arrays
    than the checkpoint holds. With `step=None` a provably damaged checkpoint
    (missing metadata, truncated or missing files) is moved aside to
    <workdir>/checkpoints_unreadable/ with a warning and the previous one is
    tried; any other error is raised and nothing is moved.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {self.manager.directory}; "
                              f"saved steps: {sorted(steps)}")
      try:
        return step, *self._restore(step, abstract_state, with_data)
      except ShapeMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not is_damage(e):
          raise
        raise CheckpointError(f"checkpoint at step {step} in {self.manager.directory} is "
                              f"unreadable: {_first_line(e)}") from e
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.manager.directory}")
    for s in steps:
      try:
        return s, *self._restore(s, abstract_state, with_data)
      except ShapeMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not is_damage(e):
          raise
        moved = self._set_aside(s)
        logging.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s "
                        "and falling back to the previous one", s, type(e).__name__,
                        _first_line(e), moved)
        print(f"warning: checkpoint step {s} is unreadable; moved to {moved}; "
              "trying the previous checkpoint", flush=True)
    raise CheckpointError(f"no readable checkpoint in {self.manager.directory}")

  def _restore(self, step, abstract_state, with_data):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = ocp.args.JsonRestore()

    def read():
      self._check_shapes(step, abstract_state)
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    out = _agreed(read, step)
    return out["state"], (out["data"] if with_data else None)

  def _check_shapes(self, step: int, abstract_state) -> None:
    """Compares the checkpoint's recorded array shapes with the config's, loading no arrays."""
    saved = self.manager.metadata(step).item_metadata
    saved = saved.get("state") if saved is not None else None
    if saved is None:
      raise Damaged(f"checkpoint step {step} has no readable state metadata")
    diffs = shape_differences(abstract_state, saved)
    if diffs:
      raise ShapeMismatch(
          f"the checkpoint at step {step} in {self.manager.directory} holds arrays of "
          f"another shape than this config builds: {format_diffs(diffs)}. Set the config "
          "back to the one saved with the checkpoints (config.json in the work dir), or use "
          "a new --workdir", diffs)

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


def _first_line(e: BaseException) -> str:
  return (str(e).splitlines() or [""])[0][:200]


def _agreed(fn, step: int):
  """fn(), with every process of a multi-process run reaching the same verdict.

  Each process reads its own shards, so one may hit a damaged file the others
  never touch; all must then move the checkpoint aside (or all raise) together.
  """
  if jax.process_count() == 1:
    return fn()
  try:
    out, verdict, err = fn(), 0, None
  except Exception as e:  # pylint: disable=broad-except
    out, verdict, err = None, (1 if is_damage(e) else 2), e
  worst = int(np.max(multihost_utils.process_allgather(np.int32(verdict))))
  if worst == 0:
    return out
  if err is not None and verdict == worst:
    raise err
  if worst == 1:
    raise Damaged(f"another process found checkpoint step {step} unreadable")
  raise CheckpointError(f"another process failed to restore checkpoint step {step}") from err
