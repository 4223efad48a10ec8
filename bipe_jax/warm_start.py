"""Fine-tuning from another run: its parameters only (`train.init_from`, `--init_from`).

    bipe-train --config=FILE --workdir=NEW --init_from=DIR [--config.data.seq_len=512 ...]

A new run starts from the parameters of DIR's latest checkpoint with a fresh
optimizer state at step 0 and its own config: a longer `data.seq_len`,
`pe.rope_scaling`, another learning-rate schedule. Parameter shapes must
match (a mismatch names the arrays). The new run reads DIR's tokenizer unless
`tokenizer.model` is set, and YaRN's `pe.rope_scaling.original_length`, left
at 0, becomes DIR's `data.seq_len`. Once NEW holds a checkpoint, starting
again resumes from it: DIR's parameters are not read again, but its
config.json and checkpoint list still are (and its tokenizer, unless
`tokenizer.model` is set), so keep DIR in place. A NEW that holds checkpoints
of a run not started from DIR is refused, never taken over.
"""
from __future__ import annotations

import os

from bipe_jax import checkpoint
from bipe_jax import config as config_lib
from bipe_jax.data import tokenizer


def _fail(init_from: str, problem: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f"--init_from={init_from}: {problem}")


def source_config(init_from: str):
  """The config DIR was trained with (its config.json)."""
  path = os.path.join(init_from, "config.json")
  if not os.path.isfile(path):
    raise _fail(init_from, f"no {path}; it must be a work dir written by bipe-train "
                "(or bipe-convert)")
  saved = config_lib.read_json(path, "it must be the config.json bipe-train wrote")
  return config_lib.from_saved(saved, path)[0]


def _latest_step(init_from: str) -> int:
  if not os.path.isdir(os.path.join(init_from, "checkpoints")) or (
      checkpoint.latest_step(init_from) is None):
    raise _fail(init_from, "holds no checkpoint to start from")
  return checkpoint.latest_step(init_from)


def _check_resumes_same_run(init_from: str, workdir: str) -> None:
  """A `workdir` holding checkpoints is resumed, so it must be the run that
  `init_from` started: another run there (say, one's own finished run) would be
  resumed with this config and `init_from`'s tokenizer, and its config.json and
  tokenized data rewritten."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  step = checkpoint.latest_step(workdir)
  if step is None:
    return
  path = os.path.join(workdir, "config.json")
  saved = config_lib.read_json(path, "restore it from a copy") if os.path.isfile(path) else {}
  started_from = ((saved.get("train") or {}).get("init_from", "")
                  if isinstance(saved, dict) else "")
  if started_from and os.path.realpath(started_from) == os.path.realpath(init_from):
    return
  raise _fail(init_from, f"--workdir={workdir} already holds a run (checkpoints up to step "
              f"{step}) that was not started from it (its config.json has train.init_from="
              f"{started_from!r}); use a new --workdir, or leave out --init_from to resume "
              "that run")


def prepare(config, workdir: str) -> None:
  """Before the corpus is read: checks `train.init_from` and fills what it implies
  into `config` (in place), printing each value it sets."""
  init_from = config.train.init_from
  if os.path.abspath(init_from) == os.path.abspath(workdir):
    raise _fail(init_from, "is the --workdir itself; run without --init_from to resume it")
  _check_resumes_same_run(init_from, workdir)
  src = source_config(init_from)
  _latest_step(init_from)
  if not config.tokenizer.model:
    path = tokenizer.run_tokenizer_path(src, init_from)
    if not os.path.isfile(path):
      raise _fail(init_from, f"its tokenizer {path} is missing; set tokenizer.model to the "
                  "tokenizer it was trained with")
    config.tokenizer.model = path
    print(f"init_from: using its tokenizer {path}", flush=True)
  scaling = config.pe.rope_scaling
  if scaling.kind == "yarn" and not scaling.original_length:
    scaling.original_length = int(src.data.seq_len)
    print(f"init_from: pe.rope_scaling.original_length={scaling.original_length} "
          "(its data.seq_len)", flush=True)
  if src.pe.kind != config.pe.kind:
    print(f"init_from: note: it was trained with pe.kind={src.pe.kind}, this run "
          f"uses {config.pe.kind}", flush=True)


def load_params(trainer, fresh_state, init_from: str):
  """`fresh_state` (a just-initialised TrainState) with the parameters of
  `init_from`'s latest checkpoint, laid out by `trainer`; optimizer state and
  step stay fresh."""
  latest = _latest_step(init_from)
  ckpt = checkpoint.Checkpointer(init_from)
  try:  # That step only: a reader never moves another run's checkpoints aside.
    step, saved, _ = ckpt.restore(latest, trainer.abstract_state(), with_data=False)
  except checkpoint.ShapeMismatch as e:
    diffs = [d for d in e.diffs if d.startswith("params/")] or e.diffs
    raise _fail(init_from, f"its parameters have other shapes than this config builds: "
                f"{checkpoint.format_diffs(diffs)}. Only data.seq_len, pe.rope_scaling, "
                "train.* and other settings that keep the shapes may change (model.*, the "
                "pe.kind tables and the tokenizer must stay as in its config.json)") from None
  finally:
    ckpt.close()
  print(f"init_from: parameters of step {step} of {init_from}; fresh optimizer "
        "state, starting at step 0", flush=True)
  return fresh_state.replace(params=saved.params)
