"""Passkey retrieval (Mohtashami & Jaggi 2023): recall a number hidden in filler text.

A prompt of exactly `length` tokens is

    BOS + INTRO + filler[:a] + KEY(key) + filler[a:] + QUESTION

where the filler repeats FILLER and a = round(depth * filler tokens), so depth
0 puts the key right after the introduction and depth 1 right before the
question. The parts are encoded one by one and concatenated, so the key sits
at a known token index. The model continues greedily (cached decoding); it is
right when the first integer in its continuation is the key. Accuracy is
reported by length (1x to 16x the training length by default) and depth.

    bipe-eval --workdir=runs/quickstart --task=passkey [--lengths=1024,2048,...]
        [--passkey_depths=0,0.25,0.5,0.75,1] [--passkey_trials=5] [--passkey_digits=5]

writes <workdir>/passkey.json and a heat map <workdir>/passkey.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
         "and memorize it. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
KEY_BEFORE, KEY_BETWEEN, KEY_AFTER = "The pass key is ", ". Remember it. ", " is the pass key.\n"
QUESTION = "What is the pass key? The pass key is "
DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_NUMBER = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class Example:
  """ids: the prompt [length] int32; key: the digits to recall; key_start: index
  of the key sentence's first token; key_tokens: indices of the key's tokens."""
  ids: np.ndarray
  key: str
  depth: float
  key_start: int
  key_tokens: tuple


def _encode(tokenizer, text: str) -> list[int]:
  return [int(t) for t in tokenizer.encode(text)]


def make_example(tokenizer, length: int, depth: float, key: str) -> Example:
  """The passkey prompt of exactly `length` tokens with `key` at `depth` (in [0, 1])."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"passkey depth {depth} must lie in [0, 1]")
  if not key.isdigit():
    raise ValueError(f"passkey {key!r} must be digits")
  intro = [tokenizer.bos_id] + _encode(tokenizer, INTRO)
  key_ids = _encode(tokenizer, key)
  sentence = _encode(tokenizer, KEY_BEFORE)
  first = len(sentence)
  sentence += key_ids + _encode(tokenizer, KEY_BETWEEN)
  second = len(sentence)
  sentence += key_ids + _encode(tokenizer, KEY_AFTER)
  question = _encode(tokenizer, QUESTION)
  n_filler = length - len(intro) - len(sentence) - len(question)
  if n_filler < 0:
    raise ValueError(f"passkey length {length} is too short: the text around the filler "
                     f"takes {length - n_filler} tokens with this tokenizer; use --lengths "
                     f"of at least {length - n_filler}")
  unit = _encode(tokenizer, FILLER)
  filler = np.tile(np.asarray(unit, np.int32), -(-n_filler // len(unit)))[:n_filler]
  a = int(round(depth * n_filler))
  ids = np.concatenate([intro, filler[:a], sentence, filler[a:], question]).astype(np.int32)
  start = len(intro) + a
  key_tokens = tuple(range(start + first, start + first + len(key_ids))) + tuple(
      range(start + second, start + second + len(key_ids)))
  return Example(ids, key, float(depth), start, key_tokens)


def score(generated: str, key: str) -> bool:
  """Right when the first integer in the continuation is the key."""
  m = _NUMBER.search(generated)
  return bool(m) and m.group(0) == key


def random_key(rng: np.random.Generator, digits: int) -> str:
  first = str(rng.integers(1, 10)) if digits > 1 else ""
  return first + "".join(str(d) for d in rng.integers(0, 10, digits - len(first)))


def accuracy(generator, params, tokenizer, lengths, depths=DEFAULT_DEPTHS, trials: int = 5,
             digits: int = 5, seed: int = 0, batch_tokens: int = 1 << 16,
             log=print) -> list[dict]:
  """[{length, depth, accuracy, trials}] by greedy decoding with `generator`
  (a bipe_jax.decode.Generator); at most batch_tokens // length prompts per call."""
  rng = np.random.default_rng(seed)
  # Each length and depth once (a repeated one would double its trials and rows).
  lengths, depths = list(dict.fromkeys(lengths)), list(dict.fromkeys(depths))
  # Every prompt first, so a length too short fails before any decoding.
  prompts = [[(d, make_example(tokenizer, length, d, random_key(rng, digits)))
              for d in depths for _ in range(trials)] for length in lengths]
  rows = []
  for length, cells in zip(lengths, prompts):
    t0 = time.time()
    max_new = max(len(_encode(tokenizer, e.key)) for _, e in cells) + 2
    per = max(1, batch_tokens // length)
    right = []
    for i in range(0, len(cells), per):
      part = cells[i:i + per]
      outs = generator(params, [e.ids for _, e in part], max_new).tokens
      right += [score(tokenizer.decode(o), e.key) for o, (_, e) in zip(outs, part)]
    for d in depths:
      marks = [r for r, (dd, _) in zip(right, cells) if dd == d]
      rows.append(dict(length=int(length), depth=float(d), accuracy=float(np.mean(marks)),
                       trials=len(marks)))
    log(f"  length {length:>6}: accuracy {np.mean(right):6.1%} over {len(right)} prompts "
        f"({time.time() - t0:.1f}s)")
  return rows


def format_table(rows: list[dict], train_length: int) -> str:
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
  lines = [f"{'length':>8} {'x train':>8} " + " ".join(f"{f'd={d:g}':>7}" for d in depths)
           + f" {'mean':>7}"]
  for n in lengths:
    accs = [cell[(n, d)] for d in depths]
    lines.append(f"{n:>8} {n / train_length:>7.1f}x " + " ".join(f"{a:>7.0%}" for a in accs)
                 + f" {np.mean(accs):>7.0%}")
  return "\n".join(lines)


def plot(rows: list[dict], train_length: int, label: str, path: str) -> None:
  """Heat map: accuracy by depth (rows) and length (columns)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
  grid = np.array([[cell[(n, d)] for n in lengths] for d in depths])
  fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(lengths)), [f"{n}\n({n / train_length:g}x)" for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_xlabel("prompt length (tokens)")
  ax.set_ylabel("key depth")
  ax.set_title(f"passkey retrieval, {label}")
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate_run(workdir: str, hf_checkpoint=None, step=None, mesh=None, overrides=(),
                 lengths=None, depths=DEFAULT_DEPTHS, trials: int = 5, digits: int = 5,
                 seed: int = 0) -> dict:
  """bipe-eval --task=passkey: the table, <workdir>/passkey.json and passkey.png."""
  import jax  # pylint: disable=g-import-not-at-top
  from bipe_jax import decode, generate  # pylint: disable=g-import-not-at-top
  config, trainer, params, tok, seps = generate.load(workdir, hf_checkpoint, step, mesh,
                                                      overrides)
  train_len = int(config.data.seq_len)
  lengths = (tuple(dict.fromkeys(lengths)) if lengths
             else tuple(m * train_len for m in DEFAULT_MULTIPLES))
  scaling = config.pe.rope_scaling
  stretched = f", rope_scaling {scaling.kind} x{scaling.factor:g}" if scaling.kind != "none" else ""
  print(f"passkey retrieval of {hf_checkpoint or workdir} (pe.kind={config.pe.kind}, trained "
        f"at {train_len} tokens{stretched}): lengths {', '.join(map(str, lengths))}", flush=True)
  gen = decode.Generator.for_trainer(trainer, tok, seps)
  rows = accuracy(gen, params, tok, lengths, depths, trials, digits, seed,
                  int(config.eval.batch_tokens))
  result = dict(workdir=os.path.abspath(workdir), pe_kind=config.pe.kind, task="passkey",
                train_length=train_len, rope_scaling=scaling.to_dict(), trials=trials,
                digits=digits, passkey=rows)
  print(format_table(rows, train_len))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "passkey.json"), "w") as f:
      json.dump(result, f, indent=1)
    plot(rows, train_len, config.pe.kind + stretched, os.path.join(workdir, "passkey.png"))
    print(f"wrote {os.path.join(workdir, 'passkey.json')} and "
          f"{os.path.join(workdir, 'passkey.png')}")
  return result
