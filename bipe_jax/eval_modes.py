"""Evaluation modes beyond non-overlapping blocks: sliding windows and per-position loss.

Sliding window (`bipe-eval --stride=S`): for each evaluation length W (the
window), windows of W tokens start at 0, S, 2S, ... in the held-out stream and
only each window's last S targets are scored, so the scored targets tile the
stream once and every scored target sees at least W - S + 1 tokens of the
window before it (its context). With S = W this is exactly the
non-overlapping evaluation. Under `data.packing = "documents"` a BOS inside a
window still restarts positions and attention, so context counts from there.

Per position (`bipe-eval --per_position`): mean next-token loss at each
position 0..W-1 over the non-overlapping blocks of length W, so one sees where
in a long input a model starts to fail.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bipe_jax import sharding
from bipe_jax.data import pipeline


def define_flags() -> None:
  flags.DEFINE_integer("stride", None, "Also score sliding windows: each evaluation length "
                       "is a window moved by this many tokens; every scored token has at "
                       "least window - stride tokens of context. Must not exceed a length.")
  flags.DEFINE_bool("per_position", False, "Also record the mean loss at each token "
                    "position of the evaluation blocks (eval.json, DIR/per_position.png).")


def check(stride: int | None, lengths) -> None:
  """Fails before any work when --stride does not fit every evaluation length."""
  if stride is not None and not 1 <= stride <= min(lengths):
    raise ValueError(f"--stride={stride} must be between 1 and the shortest evaluation "
                     f"length {min(lengths)} (each length is a window); lower --stride "
                     "or drop the short lengths from --lengths")


def sliding_batches(config, corpus, window: int, stride: int, max_tokens: int,
                    batch_tokens: int) -> Iterator[dict]:
  """make_batch dicts of windows [B, window]; loss_mask keeps each window's last `stride` targets.

  Window k is heldout_tokens[k*stride : k*stride + window + 1]; at most
  max(1, max_tokens // stride) windows (0: all), max(1, batch_tokens // window) per batch.
  """
  check(stride, [window])
  stream = corpus.heldout_tokens
  n = (len(stream) - 1 - window) // stride + 1 if len(stream) > window else 0
  if n < 1:
    raise ValueError(f"held-out split has {len(stream)} tokens, fewer than one window of "
                     f"{window} (+1 target token); use shorter eval.lengths")
  if max_tokens > 0:
    n = min(n, max(1, max_tokens // stride))
  per = max(1, batch_tokens // window)
  bos = corpus.tokenizer.bos_id
  for first in range(0, n, per):
    rows = np.stack([np.asarray(stream[k * stride:k * stride + window + 1])
                     for k in range(first, min(n, first + per))])
    doc_ids = None if config.data.packing == "windows" else np.cumsum(rows == bos, axis=1)
    batch = pipeline.make_batch(rows, corpus.separators, pipeline.level_bounds(config), doc_ids)
    batch["loss_mask"][:, :window - stride] = 0.0
    yield batch


def sliding_perplexities(trainer, params, config, corpus, lengths, stride: int,
                         log=print) -> list[dict]:
  """[{window, stride, min_context, ppl, nll, tokens, seconds}] for each length as the window."""
  rows = []
  for window in lengths:
    t0 = time.time()
    total, count = 0.0, 0.0
    for batch in sliding_batches(config, corpus, window, stride, config.eval.max_tokens,
                                 config.eval.batch_tokens):
      s, c = trainer.eval_step(params, batch)
      total, count = total + float(s), count + float(c)
    nll = total / max(count, 1.0)
    rows.append(dict(window=int(window), stride=int(stride), min_context=int(window - stride + 1),
                     ppl=math.exp(nll), nll=nll, tokens=int(count), seconds=time.time() - t0))
    log(f"  window {window:>6} stride {stride:>6}: ppl {rows[-1]['ppl']:10.3f}  "
        f"({int(count):,} tokens, each with >= {window - stride + 1} tokens of context)")
  return rows


def _token_nll(trainer):
  """Jitted (params, batch) -> (nll * loss_mask, loss_mask), [B, L] each, replicated."""
  if getattr(trainer, "_token_nll_jit", None) is None:
    def f(params, batch):
      logits_BLV = trainer.model.apply({"params": params}, batch)
      logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
      nll_BL = -jnp.take_along_axis(logp_BLV, batch["targets"][..., None], axis=-1)[..., 0]
      return nll_BL * batch["loss_mask"], batch["loss_mask"]
    repl = sharding.replicated(trainer.mesh)
    trainer._token_nll_jit = jax.jit(f, in_shardings=(trainer.param_sharding, trainer.batch_sharding),
                                     out_shardings=(repl, repl))
  return trainer._token_nll_jit


def per_position_loss(trainer, params, config, corpus, length: int) -> dict:
  """{length, blocks, mean_nll: [length]} over the evaluation blocks of `length`."""
  fn = _token_nll(trainer)
  total, count = np.zeros(length), np.zeros(length)
  blocks = 0
  for batch in pipeline.eval_batches(config, corpus, length, config.eval.max_tokens,
                                     config.eval.batch_tokens):
    rows = len(batch["tokens"])
    pad = -rows % trainer.dp  # padded rows have loss_mask 0
    if pad:
      batch = {k: np.pad(np.asarray(v), [(0, pad)] + [(0, 0)] * (np.ndim(v) - 1))
               for k, v in batch.items()}
    with jax.set_mesh(trainer.mesh):
      nll, mask = fn(params, sharding.replicated_batch(batch, trainer.batch_sharding))
    total += np.asarray(nll).sum(0)
    count += np.asarray(mask).sum(0)
    blocks += rows
  mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
  return dict(length=int(length), blocks=blocks,
              mean_nll=[None if np.isnan(x) else float(x) for x in mean])


def run(trainer, params, config, corpus, lengths, stride: int | None,
        per_position: bool) -> dict:
  """The eval.json entries of the requested modes: sliding_window, per_position."""
  out = {}
  if stride:
    out["sliding_window"] = sliding_perplexities(trainer, params, config, corpus, lengths, stride)
  if per_position:
    out["per_position"] = [per_position_loss(trainer, params, config, corpus, L) for L in lengths]
  return out


def plot(result: dict, workdir: str) -> str | None:
  """DIR/per_position.png: loss against token position, one line per length (smoothed)."""
  entries = result.get("per_position")
  if not entries:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for e in entries:
    y = np.array([np.nan if v is None else v for v in e["mean_nll"]])
    k = max(1, len(y) // 64)  # moving average over k positions keeps the curve readable
    smooth = np.convolve(np.nan_to_num(y), np.ones(k) / k, mode="valid")
    ax.plot(np.arange(len(smooth)) + (k - 1) / 2, smooth, label=f"blocks of {e['length']}")
  ax.axvline(result["train_length"], color="gray", linestyle="--", linewidth=1,
             label="training length")
  ax.set_xlabel("token position in the block")
  ax.set_ylabel("mean loss (nats)")
  ax.set_title(f"{result['pe_kind']}, step {result['step']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "per_position.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
