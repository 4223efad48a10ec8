"""Tokenized corpus, training iterator (grain) and evaluation blocks.

`prepare` turns `config.data` into a `Corpus`: every document tokenized and
concatenated with BOS in front, one stream for training and one held out, cached
as .npy next to a fingerprint. `train_iterator` cuts training rows of L+1 tokens
("windows": the release's concatenate-and-cut; "documents": per-document chunks
packed with restarts) and `eval_batches` cuts the held-out stream into
non-overlapping blocks. Both emit `make_batch` dicts, [B, L] each:
  tokens, targets (int32), intra, inter, positions, doc_ids (int32), loss_mask (f32),
and with pe.levels = K > 2 also levels (int32 [B, K-2, L], the ids between intra
and inter). Ids are computed per row after windowing or packing, so every level
restarts at each row and document start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator

from absl import logging
import grain
from grain.experimental import FirstFitPackIterDataset
import numpy as np

from bipe_jax import positions
from bipe_jax.data import levels, sources
from bipe_jax.data.tokenizer import Tokenizer, load_or_train
from bipe_jax.encodings import absolute

PACKINGS = ("windows", "documents")
_CACHE_VERSION = 1
_ENCODE_BATCH_BYTES = 4_000_000  # Text handed to one multi-threaded encode call.


@dataclasses.dataclass
class Corpus:
  """A tokenized corpus: documents concatenated, each preceded by `bos_id`.

  Attributes:
    tokenizer: the Tokenizer that produced the ids.
    is_separator: bool [V], which ids end a segment (config.segmentation).
    train_tokens, heldout_tokens: int32 [N] token streams.
    separators: which tokens end a unit of which of pe.levels levels (by
      default the two levels of `is_separator`).
    train_doc_starts, heldout_doc_starts: int64 [D], offset of each document's BOS.
    stats: documents / bytes / files per split, for logs and reports.
  """
  tokenizer: Tokenizer
  is_separator: np.ndarray
  train_tokens: np.ndarray
  heldout_tokens: np.ndarray
  train_doc_starts: np.ndarray
  heldout_doc_starts: np.ndarray
  stats: dict = dataclasses.field(default_factory=dict)
  separators: positions.LevelSeparators | None = None

  def __post_init__(self):
    if self.separators is None:
      self.separators = positions.LevelSeparators.of(np.asarray(self.is_separator, bool))

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


def _check_packing(packing: str):
  if packing not in PACKINGS:
    raise ValueError(f"data.packing must be one of {PACKINGS}, got {packing!r}")


# Reading and tokenizing ---------------------------------------------------------

class _Plan:
  """Which files are read, and which file / document goes to which split."""

  def __init__(self, config, cache_dir: str = ""):
    dc = config.data
    self.dc = dc
    self.paths = sources.list_files(dc.source, config, cache_dir)
    self.root = sources.source_root(dc.source, self.paths)
    self.keys = [os.path.relpath(os.path.abspath(p), self.root).replace(os.sep, "/")
                 for p in self.paths]
    # One file: split its documents; several: split whole files.
    self.by_document = len(self.paths) == 1
    heldout = set()
    if not self.by_document:
      _, held = sources.split_files(self.paths, dc.heldout_fraction, self.root)
      heldout = set(held)
    self.file_heldout = [p in heldout for p in self.paths]

  def documents(self) -> Iterator[tuple[int, int, str, bool]]:
    """(file index, document index in file, text, held out) in reading order."""
    n = 0
    for f, path in enumerate(self.paths):
      for j, text in enumerate(sources.read_documents(path, self.dc.format,
                                                      self.dc.text_field)):
        if self.dc.max_documents and n >= self.dc.max_documents:
          return
        n += 1
        held = (sources.is_heldout_document(j, self.dc.heldout_fraction, self.keys[f])
                if self.by_document else self.file_heldout[f])
        yield f, j, text, held

  def tokenizer_sample(self, sample_bytes: int) -> Iterator[str]:
    """Training documents, thinned by a stable hash so the sample spans the corpus."""
    train_bytes = sum(os.path.getsize(p) for p, h in zip(self.paths, self.file_heldout)
                      if not h)
    keep = 1.0 if self.dc.max_documents else min(1.0, 1.2 * sample_bytes / max(1, train_bytes))
    for f, j, text, held in self.documents():
      if not held and sources.stable_fraction(f"sample:{self.keys[f]}#{j}") < keep:
        yield text

  def fingerprint(self, tokenizer: Tokenizer) -> dict:
    stats = [os.stat(p) for p in self.paths]
    return {"version": _CACHE_VERSION, "source": self.dc.source,
            "format": self.dc.format, "text_field": self.dc.text_field,
            "heldout_fraction": float(self.dc.heldout_fraction),
            "max_documents": int(self.dc.max_documents),
            "files": [[p, s.st_size, s.st_mtime_ns] for p, s in zip(self.paths, stats)],
            "tokenizer_sha256": tokenizer.file_hash()}


def _concat(docs: list[np.ndarray], bos: int) -> tuple[np.ndarray, np.ndarray]:
  """BOS + doc for each doc, as one int32 stream and int64 BOS offsets."""
  lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  out = np.empty(int(lengths.sum()), dtype=np.int32)
  out[starts] = bos
  for s, d in zip(starts, docs):
    out[s + 1:s + 1 + len(d)] = d
  return out, starts


def _tokenize(plan: _Plan, tok: Tokenizer) -> tuple[dict, dict]:
  """Tokenizes every document; returns ({split: (tokens, starts)}, stats)."""
  docs, held, nbytes = [], [], []
  t0 = last = time.time()
  pending, pending_held, pending_bytes = [], [], 0
  files_done = 0

  def flush():
    nonlocal pending, pending_held, pending_bytes
    for ids, h, text in zip(tok.encode_batch(pending), pending_held, pending):
      if len(ids):  # An empty document would only add a lone BOS.
        docs.append(ids)
        held.append(h)
        nbytes.append(len(text.encode("utf-8")))
    pending, pending_held, pending_bytes = [], [], 0

  for f, _, text, h in plan.documents():
    files_done = f
    pending.append(text)
    pending_held.append(h)
    pending_bytes += len(text)
    if pending_bytes >= _ENCODE_BATCH_BYTES:
      flush()
      if time.time() - last > 5:
        last = time.time()
        print(f"tokenized {f + 1}/{len(plan.paths)} files, {sum(map(len, docs)):,} "
              f"tokens, {last - t0:.1f} s", flush=True)
  flush()
  if not docs:
    raise ValueError(f"data.source {plan.dc.source!r} produced no documents with "
                     f"tokens ({len(plan.paths)} file(s) read, format "
                     f"{plan.dc.format!r}, text_field {plan.dc.text_field!r})")
  held = np.array(held, dtype=bool)
  if plan.by_document:  # Now that the count is known, apply the >= 1 guarantee.
    held = sources.split_documents(len(docs), plan.dc.heldout_fraction, plan.keys[0])
  out, stats = {}, {"files": len(plan.paths)}
  for name, mask in (("train", ~held), ("heldout", held)):
    chosen = [d for d, m in zip(docs, mask) if m]
    out[name] = _concat(chosen, tok.bos_id) if chosen else (
        np.zeros(0, np.int32), np.zeros(0, np.int64))
    stats[f"{name}_documents"] = len(chosen)
    stats[f"{name}_bytes"] = int(sum(b for b, m in zip(nbytes, mask) if m))
    stats[f"{name}_tokens"] = int(len(out[name][0]))
  print(f"tokenized {files_done + 1}/{len(plan.paths)} files in {time.time() - t0:.1f} s: "
        f"{stats['train_tokens']:,} train tokens ({stats['train_documents']} docs), "
        f"{stats['heldout_tokens']:,} held-out tokens ({stats['heldout_documents']} docs)",
        flush=True)
  return out, stats


_ARRAYS = ("train_tokens", "train_doc_starts", "heldout_tokens", "heldout_doc_starts")


def _save_atomic(path: str, write, mode: str = "wb"):
  tmp = f"{path}.tmp{uuid.uuid4().hex}"
  with open(tmp, mode) as f:
    write(f)
  os.replace(tmp, path)  # Readers never see half-written files.


def _load_cache(cache_dir: str, meta_path: str, fingerprint: dict):
  """(arrays, stats) of a cache made with `fingerprint`, else (None, None).

  A damaged cache (unreadable meta.json, a truncated or missing .npy, a length
  that disagrees with meta.json) is reported and rebuilt, never trusted.
  """
  if not os.path.isfile(meta_path):
    return None, None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
      return None, None
    stats = meta["stats"]
    arrays = {}
    for a in _ARRAYS:
      path = os.path.join(cache_dir, f"{a}.npy")
      # Memory-mapped: a large corpus costs no RAM until windows are read.
      arrays[a] = np.load(path, mmap_mode="r")
      expected = stats.get(a.replace("_doc_starts", "_documents"), len(arrays[a]))
      if arrays[a].ndim != 1 or len(arrays[a]) != expected:
        raise ValueError(f"{path} holds {arrays[a].shape} values, meta.json says {expected}")
  except (OSError, EOFError, ValueError, KeyError, AttributeError, TypeError) as e:
    print(f"warning: the tokenized-data cache in {cache_dir} is damaged ({e}); "
          "tokenizing again", flush=True)
    return None, None
  logging.info("reusing tokenized corpus in %s", cache_dir)
  return arrays, stats


def prepare(config, workdir: str) -> Corpus:
  """Lists, splits, tokenizes (or loads from cache) the corpus of `config.data`.

  Cache: `config.data.cache_dir or <workdir>/data` holds tokenizer.model and the
  token arrays with meta.json; they are reused while the file list, sizes,
  mtimes, tokenizer and data options match.
  """
  dc = config.data
  _check_packing(dc.packing)
  cache_dir = dc.cache_dir or os.path.join(workdir, "data")
  os.makedirs(cache_dir, exist_ok=True)
  plan = _Plan(config, cache_dir)
  tok = load_or_train(config, cache_dir,
                      lambda: plan.tokenizer_sample(int(config.tokenizer.sample_bytes)))
  seg = config.segmentation
  seps = levels.separators(tok, config.pe.levels, seg.modality, seg.cot_delimiter,
                           seg.separator_ids, seg.level_separator_ids)
  fingerprint = plan.fingerprint(tok)
  meta_path = os.path.join(cache_dir, "meta.json")
  arrays, stats = _load_cache(cache_dir, meta_path, fingerprint)
  if arrays is None:
    splits, stats = _tokenize(plan, tok)
    arrays = {"train_tokens": splits["train"][0], "train_doc_starts": splits["train"][1],
              "heldout_tokens": splits["heldout"][0],
              "heldout_doc_starts": splits["heldout"][1]}
    for a, v in arrays.items():
      _save_atomic(os.path.join(cache_dir, f"{a}.npy"), lambda f, v=v: np.save(f, v))
    # meta.json last: it is what marks the arrays as complete.
    _save_atomic(meta_path, lambda f: json.dump(
        {"fingerprint": fingerprint, "stats": stats}, f, indent=1), mode="w")
  if len(arrays["train_tokens"]) < 2:
    raise ValueError(f"data.source {dc.source!r} produced no training tokens "
                     f"(held-out fraction {dc.heldout_fraction})")
  if not len(arrays["heldout_tokens"]):
    logging.warning("data.source %r has an empty held-out split", dc.source)
  if seps.levels > 2:
    levels.report(seps, arrays["train_tokens"], config.segmentation)
  return Corpus(tokenizer=tok, is_separator=seps.is_separator, separators=seps,
                stats=stats, **arrays)


# Batches ------------------------------------------------------------------------

def make_batch(rows, separators, max_ids, doc_ids=None, valid=None) -> dict:
  """Model inputs from rows of L+1 tokens.

  Args:
    rows: int [B, L+1]; inputs are rows[:, :-1], targets rows[:, 1:].
    separators: a bool [V] table (two levels) or a positions.LevelSeparators
      (K levels, e.g. Corpus.separators).
    max_ids: intra ids clip to max_ids - 1 (None: no clipping); or a sequence,
      one bound per inner level (`level_bounds(config)`).
    doc_ids: optional int [B, L+1] document of each row token (None: one document).
    valid: optional bool [B, L+1], False at padding (None: all real).

  Returns:
    dict of [B, L] numpy arrays: tokens, targets, intra, inter, positions,
    doc_ids (int32) and loss_mask (float32: 1 where the target is a real token
    of the input token's document); with K > 2 levels also levels, int32
    [B, K-2, L], the ids of levels 1..K-2 (positions.level_ids).
  """
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[1] < 2:
    raise ValueError(f"rows must be [B, L+1] with L >= 1, got {rows.shape}")
  tokens = rows[:, :-1].astype(np.int32)
  if doc_ids is None:
    docs = np.zeros(rows.shape, dtype=np.int32)
  else:
    docs = np.asarray(doc_ids).astype(np.int32)
    if docs.shape != rows.shape:
      raise ValueError(f"doc_ids {docs.shape} must be shaped like rows {rows.shape}")
  real = np.ones(rows.shape, bool) if valid is None else np.asarray(valid, bool)
  mask = real[:, 1:] & real[:, :-1] & (docs[:, 1:] == docs[:, :-1])
  seps = positions.LevelSeparators.of(separators)
  row_docs = None if doc_ids is None else docs[:, :-1]
  ids = positions.level_ids(seps.classes(tokens, row_docs), seps.levels, max_ids, row_docs)
  out = {"tokens": tokens, "targets": rows[:, 1:].astype(np.int32),
         "intra": ids[0], "inter": ids[-1],
         "positions": positions.flat_positions(docs[:, :-1]),
         "doc_ids": docs[:, :-1], "loss_mask": mask.astype(np.float32)}
  if seps.levels > 2:
    out["levels"] = np.ascontiguousarray(ids[1:-1].transpose(1, 0, 2))
  return out


def level_bounds(config) -> tuple[int, ...]:
  """Clip bound of every inner level, finest first: pe.max_intra, then pe.max_level_ids."""
  return absolute.IntraParams.from_fields(config.pe).inner_sizes


def _document_chunks(doc_starts, n_tokens: int, length: int):
  """Chunks of <= length+1 tokens per document, overlapping by one token.

  Overlap by one so that every next-token target inside a document is trained
  exactly once although each chunk only predicts within itself.
  Returns int64 (starts, ends).
  """
  doc_starts = np.asarray(doc_starts, dtype=np.int64)
  doc_ends = np.append(doc_starts[1:], n_tokens)
  counts = np.maximum(0, -(-(doc_ends - doc_starts - 1) // length))
  starts = np.repeat(doc_starts, counts) + length * (
      np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
  ends = np.minimum(starts + length + 1, np.repeat(doc_ends, counts))
  return starts, ends


def train_iterator(config, corpus: Corpus, seed: int | None = None,
                   shard_index: int = 0, shard_count: int = 1):
  """Endless, deterministic iterator of training batches (grain).

  `next(it)` gives a `make_batch` dict of [B, L] with B = config.train.batch_size
  / shard_count and L = config.data.seq_len; `it.get_state()` is a JSON-able dict
  and `it.set_state(state)` resumes at exactly that batch. Shard i of n (one per
  host) reads every n-th element of the same shuffled order.
  """
  dc = config.data
  _check_packing(dc.packing)
  seed = config.seed if seed is None else seed
  length = int(dc.seq_len)
  batch = int(config.train.batch_size)
  if batch % shard_count:
    raise ValueError(f"train.batch_size {batch} is not divisible by {shard_count} shards")
  batch //= shard_count
  tokens, seps, bounds = corpus.train_tokens, corpus.separators, level_bounds(config)
  # One background thread computes a few batches ahead; more buys nothing on
  # small hosts and a large buffer would hold hundreds of batches in memory.
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  if dc.packing == "windows":
    n = (len(tokens) - 1) // length
    if n < 1:
      raise ValueError(f"training split has {len(tokens)} tokens, fewer than one "
                       f"window of data.seq_len + 1 = {length + 1}")
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    ds = ds.slice(slice(shard_index, None, shard_count)) if shard_count > 1 else ds
    ds = ds.map(lambda i: np.asarray(tokens[i * length:i * length + length + 1]))
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(lambda rows: make_batch(rows, seps, bounds))
    return iter(ds.to_iter_dataset(read))
  starts, ends = _document_chunks(corpus.train_doc_starts, len(tokens), length)
  if not len(starts):
    raise ValueError("training split has no document with a next-token target")
  ds = grain.MapDataset.range(len(starts)).shuffle(seed=seed).repeat()
  ds = ds.slice(slice(shard_index, None, shard_count)) if shard_count > 1 else ds
  ds = ds.map(lambda i: {"tokens": np.asarray(tokens[starts[i]:ends[i]], np.int32)})
  packed = FirstFitPackIterDataset(
      ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)),
      length_struct={"tokens": length + 1}, num_packing_bins=max(batch, 32),
      seed=seed, shuffle_bins=True,
      padding_struct={"tokens": corpus.tokenizer.pad_id})
  # Segment ids count 1, 2, ... per packed chunk and are 0 at padding.
  out = packed.batch(batch, drop_remainder=True).map(
      lambda b: make_batch(b["tokens"], seps, bounds,
                           doc_ids=b["tokens_segment_ids"],
                           valid=b["tokens_segment_ids"] > 0))
  return iter(out)


def eval_batches(config, corpus: Corpus, length: int, max_tokens: int,
                 batch_tokens: int) -> Iterator[dict]:
  """Held-out stream in non-overlapping blocks of `length` targets, batched.

  Block i is heldout_tokens[i*length : i*length + length + 1] (remainder dropped),
  at most `max_tokens` targets in all (0: every block; at least one block),
  max(1, batch_tokens // length) blocks per batch (the last may have fewer).
  Every block starts at inter 0, intra 0. doc_ids are 0 for "windows" packing,
  else the document index within the block (so positions restart at each BOS
  and a target BOS is masked).
  """
  _check_packing(config.data.packing)
  stream = corpus.heldout_tokens
  n = (len(stream) - 1) // length if len(stream) else 0
  if n < 1:
    raise ValueError(f"held-out split has {len(stream)} tokens, fewer than one "
                     f"evaluation block of length {length} (+1 target token); use "
                     "shorter eval.lengths or a larger data.heldout_fraction")
  if max_tokens > 0:
    n = min(n, max(1, max_tokens // length))
  per = max(1, batch_tokens // length)
  bos = corpus.tokenizer.bos_id
  for first in range(0, n, per):
    rows = np.stack([np.asarray(stream[i * length:i * length + length + 1])
                     for i in range(first, min(n, first + per))])
    doc_ids = None if config.data.packing == "windows" else np.cumsum(rows == bos, axis=1)
    yield make_batch(rows, corpus.separators, level_bounds(config), doc_ids)


def unigram_perplexity(tokens) -> float:
  """exp(entropy) of the empirical unigram distribution of `tokens` (any shape).

  The perplexity of a model that knows only token frequencies, measured on
  the data those frequencies come from: a floor any real model should beat.
  """
  tokens = np.asarray(tokens).reshape(-1)
  if not tokens.size:
    raise ValueError("unigram_perplexity needs at least one token")
  counts = np.bincount(tokens.astype(np.int64))
  p = counts[counts > 0] / tokens.size
  return float(np.exp(-(p * np.log(p)).sum()))
