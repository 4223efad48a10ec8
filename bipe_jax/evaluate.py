"""Perplexity by evaluation length from a restored checkpoint.

    bipe-eval --workdir=runs/quickstart [--step=N] [--lengths=128,256,512,1024]
        [--mesh=data=2,tensor=4] [--config.eval.max_tokens=65536 ...]

`--config.KEY=VALUE` changes the work dir's saved config for this evaluation;
--lengths, --source and --mesh are short for eval.lengths, data.source and
mesh.shape. The checkpoint restores onto any mesh: --mesh, else the training
mesh when it fits the devices here, else all devices along `data`.

Held-out documents are concatenated and cut into non-overlapping blocks of each
length (remainder dropped), as in the paper. Prints a table; writes
<workdir>/eval.json and <workdir>/eval.png. `--task=passkey` runs passkey
retrieval instead (bipe_jax/tasks/passkey.py): passkey.json and passkey.png.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

from absl import flags
import jax
import ml_collections
import numpy as np

from bipe_jax import checkpoint, cli, eval_modes, sharding
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline
from bipe_jax.data import tokenizer as tokenizer_lib
from bipe_jax.interop import release
from bipe_jax.tasks import arithmetic
from bipe_jax.trainer import Trainer


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(
        f"{path} not found: --workdir must be a directory written by bipe-train")
  saved = config_lib.read_json(path, "restore it from a copy, or rewrite it by starting "
                               "bipe-train on this --workdir with the run's --config")
  config, defaulted = config_lib.from_saved(saved, path)
  if defaulted:
    print(f"{path} predates {len(defaulted)} config keys; using their defaults: "
          f"{', '.join(defaulted)}")
  return config


def restore_params(config, workdir: str, vocab_size: int, step: int | None = None,
                   mesh=None):
  """(trainer, state) with the state restored onto `mesh` (default: config.mesh)."""
  trainer = Trainer(config, vocab_size, mesh)
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    _, state, _ = ckpt.restore(step, trainer.abstract_state(), with_data=False)
  finally:
    ckpt.close()
  return trainer, state


def perplexities(trainer: Trainer, params, config, corpus, lengths, max_tokens: int,
                 batch_tokens: int, log=print) -> list[dict]:
  """[{length, ppl, nll, tokens, unigram_ppl, seconds}] for each evaluation length.

  `tokens` counts the targets scored (loss mask 1); `unigram_ppl` is the
  unigram perplexity of exactly those targets.
  """
  rows = []
  for length in lengths:
    t0 = time.time()
    total, count, scored = 0.0, 0.0, []
    for batch in full_batches(config, corpus, length, max_tokens, batch_tokens):
      s, c = trainer.eval_step(params, batch)
      total, count = total + float(s), count + float(c)
      scored.append(batch["targets"][batch["loss_mask"] > 0])
    nll = total / max(count, 1.0)
    rows.append(dict(length=int(length), ppl=math.exp(nll), nll=nll, tokens=int(count),
                     unigram_ppl=pipeline.unigram_perplexity(np.concatenate(scored)),
                     seconds=time.time() - t0))
    log(f"  length {length:>6}: ppl {rows[-1]['ppl']:10.3f}  ({int(count):,} tokens, "
        f"{rows[-1]['seconds']:.1f}s)")
  return rows


def full_batches(config, corpus, length: int, max_tokens: int, batch_tokens: int):
  """pipeline.eval_batches with the last, smaller batch padded to the rows of the
  first with masked rows (loss mask 0, so they add nothing): one batch shape per
  length, so the evaluation step compiles once per length."""
  rows = None
  for batch in pipeline.eval_batches(config, corpus, length, max_tokens, batch_tokens):
    rows = rows or len(batch["tokens"])
    pad = rows - len(batch["tokens"])
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    yield batch


def evaluate(workdir: str, step: int | None = None, lengths=None, mesh: str | None = None,
             hf_checkpoint: str | None = None, source: str | None = None,
             overrides=(), stride: int | None = None,
             per_position: bool = False) -> dict:
  """Perplexity table of a checkpoint in `workdir`, or of a release dir `hf_checkpoint`.

  `source` replaces config.data.source (its held-out split is scored, tokenized
  with the run's own tokenizer); its tokenized cache goes to a directory of its
  own so the training cache stays.
  `overrides`: [(KEY, VALUE text)] set on the config first (`--config.KEY=VALUE`).
  """
  imported = release.load(hf_checkpoint) if hf_checkpoint else None
  config = imported.config if imported else load_config(workdir)
  trained_source = config.data.source
  cli.apply_overrides(config, overrides)
  if imported:
    os.makedirs(workdir, exist_ok=True)
  if source:
    if not imported and not config.tokenizer.model:
      # The checkpoint's own tokenizer scores the other corpus, not one trained on it.
      config.tokenizer.model = _run_tokenizer(config, workdir)
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    config.data.source = source
    config.data.cache_dir = os.path.join(workdir, "data_eval", digest)
  choose_mesh(config, mesh)
  if lengths:
    config.eval.lengths = tuple(lengths)
  config_lib.validate(config)
  lengths = tuple(config.eval.lengths)
  eval_modes.check(stride, lengths)
  corpus = pipeline.prepare(config, workdir)
  if config.data.source != "arithmetic":
    _check_heldout_fits(config, corpus, lengths)
  if imported:
    if corpus.vocab_size != imported.model_cfg.vocab_size:
      raise ValueError(f"the tokenizer has {corpus.vocab_size} pieces but the checkpoint "
                       f"{imported.model_cfg.vocab_size}: put the release's tokenizer.model "
                       f"in {hf_checkpoint}")
    trainer = Trainer(config, corpus.vocab_size)
    params, step = jax.device_put(imported.params, trainer.param_sharding), 0
  else:
    trainer, state = restore_params(config, workdir, corpus.vocab_size, step)
    params, step = state.params, int(state.step)
  if config.data.source == "arithmetic":  # scored by generation, not perplexity
    return arithmetic.evaluate_run(trainer, params, config, corpus, workdir, step)
  train_len = config.data.seq_len
  scaling = config.pe.rope_scaling
  stretched = f", rope_scaling {scaling.kind} x{scaling.factor:g}" if scaling.kind != "none" else ""
  print(f"evaluating step {step} of {workdir} (pe.kind={config.pe.kind}{stretched}, "
        f"trained at {train_len} tokens)", flush=True)
  rows = perplexities(trainer, params, config, corpus, lengths,
                      config.eval.max_tokens, config.eval.batch_tokens)
  # The baseline scores the same targets as the model at the shortest length.
  unigram = min(rows, key=lambda r: r["length"])["unigram_ppl"]
  result = dict(workdir=os.path.abspath(workdir), step=step, pe_kind=config.pe.kind,
                train_length=train_len, unigram_ppl=unigram, results=rows,
                rope_scaling=scaling.to_dict(), source=config.data.source)
  result.update(eval_modes.run(trainer, params, config, corpus, lengths, stride, per_position))
  print(format_table(result))
  if jax.process_index() == 0:
    _set_aside_other_eval(workdir, result, trained_source)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
    plot(result, os.path.join(workdir, "eval.png"))
    eval_modes.plot(result, workdir)
    print(f"wrote {os.path.join(workdir, 'eval.json')} and {os.path.join(workdir, 'eval.png')}")
  return result


def _set_aside_other_eval(workdir: str, result: dict, trained_source: str) -> None:
  """Moves an eval.json of another corpus or context extension (and its plot) to
  eval_before_<time>.json, so scoring a run on a second corpus keeps the first
  result. A rerun with the same settings (e.g. after more training) replaces it."""
  path = os.path.join(workdir, "eval.json")
  if not os.path.isfile(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    same = (isinstance(old, dict) and old.get("source", trained_source) == result["source"]
            and old.get("rope_scaling") == result["rope_scaling"])
  except (OSError, ValueError):
    same = False
  if same:
    return
  stem = os.path.join(workdir, time.strftime("eval_before_%Y%m%d-%H%M%S"))
  os.replace(path, stem + ".json")
  if os.path.isfile(os.path.join(workdir, "eval.png")):
    os.replace(os.path.join(workdir, "eval.png"), stem + ".png")
  print(f"kept the previous eval.json (another corpus or context extension) as {stem}.json",
        flush=True)


def _run_tokenizer(config, workdir: str) -> str:
  """The tokenizer file the run in `workdir` trained with; fails naming it if gone."""
  path = tokenizer_lib.run_tokenizer_path(config, workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: --source is scored with the tokenizer the run trained with; "
        "run bipe-eval once without --source (it rebuilds the run's data cache from its "
        "training data.source), or set --config.tokenizer.model=PATH")
  return path


def _check_heldout_fits(config, corpus, lengths) -> None:
  """Fails before any compilation when the longest length has no full block."""
  n, longest = len(corpus.heldout_tokens), max(lengths)
  if n > longest:
    return
  fits = ",".join(str(L) for L in lengths if L < n)
  example = f", e.g. --lengths={fits}" if fits else ""
  fix = f"use --lengths below {n}{example}, or " if n > 1 else ""
  raise ValueError(f"--lengths (eval.lengths) {longest}: the held-out split of data.source "
                   f"{config.data.source!r} has {n} tokens, fewer than one evaluation block "
                   f"of {longest} (+1 target token); {fix}raise data.heldout_fraction")


def choose_mesh(config, mesh: str | None) -> None:
  """Sets config.mesh to `mesh` (e.g. "data=2,tensor=4") if given, else keeps the
  training mesh when it fits the devices here, else puts all devices along data."""
  if mesh:
    config.mesh.shape, config.mesh.dcn_shape = mesh, ""
  elif not _mesh_fits(config):
    config.mesh.shape, config.mesh.dcn_shape = "data=-1", ""


def _mesh_fits(config) -> bool:
  try:
    sharding.mesh_sizes(config)
  except ValueError:
    return False
  return True


def format_table(result: dict) -> str:
  lines = [f"{'length':>8} {'x train':>8} {'perplexity':>12} {'tokens':>10}"]
  for r in result["results"]:
    lines.append(f"{r['length']:>8} {r['length'] / result['train_length']:>7.1f}x "
                 f"{r['ppl']:>12.3f} {r['tokens']:>10,}")
  lines.append(f"unigram perplexity of the same held-out tokens: {result['unigram_ppl']:.3f}")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  xs = [r["length"] for r in result["results"]]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(xs, [r["ppl"] for r in result["results"]], marker="o", label=result["pe_kind"])
  ax.axvline(result["train_length"], color="gray", linestyle="--", linewidth=1, label="training length")
  ax.axhline(result["unigram_ppl"], color="red", linestyle=":", linewidth=1, label="unigram")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("evaluation length (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title(f"step {result['step']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags() -> None:
  """CLI flags; defined only when run as a program, so importing stays side-effect free."""
  flags.DEFINE_string("workdir", None, "A work dir written by bipe-train.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
  flags.DEFINE_list("lengths", None, "Evaluation lengths (default: config eval.lengths).")
  flags.DEFINE_string("hf_checkpoint", None, "Evaluate an authors' release directory "
                      "(config.json, model.safetensors, tokenizer.model) instead of a "
                      "checkpoint; --workdir then only holds caches and results.")
  flags.DEFINE_string("source", None, "Evaluate on the held-out split of these files/globs "
                      "instead of the training config's data.source.")
  flags.DEFINE_string("mesh", None, "Mesh to evaluate on, e.g. data=2,tensor=4 (default: the "
                      "training mesh if it fits the devices here, else all along data).")
  flags.DEFINE_enum("task", "perplexity", ["perplexity", "passkey"], "perplexity by "
                    "length (arithmetic runs: accuracy by operators), or passkey retrieval "
                    "(bipe_jax/tasks/passkey.py; --lengths default 1x..16x data.seq_len).")
  flags.DEFINE_list("passkey_depths", ["0", "0.25", "0.5", "0.75", "1"],
                    "--task=passkey: depths of the key in the prompt, in [0, 1].")
  flags.DEFINE_integer("passkey_trials", 5, "--task=passkey: prompts per length and depth.")
  flags.DEFINE_integer("passkey_digits", 5, "--task=passkey: digits of the key.")
  eval_modes.define_flags()
  sharding.define_flags()


# Flags that set a config key; `--config.KEY=VALUE` for these is the same thing.
_FLAG_KEYS = {"lengths": "eval.lengths", "source": "data.source", "mesh": "mesh.shape"}


def main(overrides) -> None:
  f = flags.FLAGS
  cli.required("--workdir=runs/quickstart", workdir=f.workdir)
  if f.step is not None and f.step < 0:
    raise config_lib.ConfigError(f"--step={f.step} must be a saved step (>= 0); omit it "
                                 "for the latest checkpoint")
  given = {flag: getattr(f, flag) for flag in _FLAG_KEYS}
  named = {flag: flag for flag in _FLAG_KEYS}
  rest = []
  for key, text in overrides:
    flag = next((k for k, v in _FLAG_KEYS.items() if v == key), None)
    if flag is None:
      rest.append((key, text))
    elif f[flag].present:
      raise config_lib.ConfigError(f"--{flag} and --config.{key} set the same thing; pass one")
    else:
      given[flag], named[flag] = text, f"config.{key}"
  lengths = given["lengths"]
  if lengths is not None:
    items = lengths.strip("()[] ").split(",") if isinstance(lengths, str) else lengths
    lengths = cli.positive_ints(named["lengths"], items, "128,256,512")
  sharding.initialize_from_flags()
  if f.task == "passkey":
    _passkey(f, lengths, given, rest)
    return
  evaluate(f.workdir, f.step, lengths, given["mesh"], f.hf_checkpoint, given["source"], rest,
           f.stride, f.per_position)


def _passkey(f, lengths, given, overrides) -> None:
  from bipe_jax.tasks import passkey  # pylint: disable=g-import-not-at-top
  if given["source"]:
    raise config_lib.ConfigError("--source does not apply to --task=passkey (its prompts "
                                 "are built from a fixed filler text)")
  try:
    depths = tuple(float(d) for d in f.passkey_depths)
  except ValueError:
    depths = ()
  if not depths or not all(0.0 <= d <= 1.0 for d in depths):
    raise config_lib.ConfigError(f"--passkey_depths={','.join(f.passkey_depths)!r} must be "
                                 "numbers in [0, 1], e.g. --passkey_depths=0,0.5,1")
  for name in ("passkey_trials", "passkey_digits"):
    if f[name].value < 1:
      raise config_lib.ConfigError(f"--{name}={f[name].value} must be >= 1")
  passkey.evaluate_run(f.workdir, f.hf_checkpoint, f.step, given["mesh"], overrides, lengths,
                       depths, f.passkey_trials, f.passkey_digits)


def run(argv=None) -> None:
  """Console entry point `bipe-eval`."""
  cli.run(main, define_flags, argv)


if __name__ == "__main__":
  run()
