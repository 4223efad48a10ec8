"""Bilevel position ids (BIPE_METHOD section 1), computed in the input pipeline.

A separator token ends a segment and belongs to the segment it ends. For token t:
  inter[t] = number of separators strictly before t (segment index),
  intra[t] = t - first index of t's segment (position inside the segment),
both restarting at every document start when `doc_ids` are given.

The same rule, one token at a time, is `BilevelState.advance`; `step_ids` is
that rule in jnp for a batch of rows at once, with the pipeline's document
restarts, and cached decoding (bipe_jax.decode) runs it on device, so the
pipeline and generation can never disagree (tests check it against
`bilevel_ids` on whole rows).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def bilevel_ids(tokens, is_separator, max_intra: int | None = None,
                doc_ids=None, per_token: bool | None = None):
  """Intra- and inter-segment position ids.

  Args:
    tokens: int array [..., L].
    is_separator: bool lookup table [V] over the vocabulary, or a bool array
      shaped like `tokens` marking separator tokens (pass `per_token=True` when
      both are 1-D and could be confused).
    max_intra: if given, intra ids are clipped to `max_intra - 1`.
    doc_ids: optional int array like `tokens`; both counters restart wherever
      the document id changes from one token to the next.
    per_token: force the interpretation of `is_separator` (None: a same-shaped
      mask when tokens has more than one dimension, a table otherwise).

  Returns:
    (intra, inter), int32 arrays shaped like `tokens`.
  """
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(f"tokens must be integers, got {tokens.dtype}")
  is_separator = np.asarray(is_separator)
  if is_separator.dtype != np.bool_:
    raise TypeError(f"is_separator must be boolean, got {is_separator.dtype}")
  if per_token is None:
    per_token = is_separator.shape == tokens.shape and tokens.ndim > 1
  if per_token:
    if is_separator.shape != tokens.shape:
      raise ValueError(f"per-token separator mask {is_separator.shape} must be "
                       f"shaped like tokens {tokens.shape}")
    sep = is_separator
  else:
    if is_separator.ndim != 1:
      raise ValueError("is_separator must be a [V] table or shaped like tokens")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= is_separator.shape[0]):
      raise ValueError(
          f"token ids must lie in [0, {is_separator.shape[0]}) (the separator "
          f"table's vocabulary size); got [{tokens.min()}, {tokens.max()}]")
    sep = is_separator[tokens]

  length = tokens.shape[-1]
  idx = np.broadcast_to(np.arange(length, dtype=np.int64), tokens.shape)
  # A segment starts at index 0, after a separator, and at a document start.
  starts = np.zeros(tokens.shape, dtype=bool)
  starts[..., 0] = True
  starts[..., 1:] = sep[..., :-1]
  doc_start = np.zeros(tokens.shape, dtype=bool)
  doc_start[..., 0] = True
  if doc_ids is not None:
    doc_ids = np.asarray(doc_ids)
    if doc_ids.shape != tokens.shape:
      raise ValueError(f"doc_ids {doc_ids.shape} must be shaped like tokens "
                       f"{tokens.shape}")
    doc_start[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    starts |= doc_start

  seg_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
  intra = idx - seg_start
  # Separators strictly before t, minus those before t's document start.
  before = np.cumsum(sep, axis=-1, dtype=np.int64) - sep
  doc_first = np.maximum.accumulate(np.where(doc_start, idx, 0), axis=-1)
  inter = before - np.take_along_axis(before, doc_first, axis=-1)
  if max_intra is not None:
    if max_intra < 1:
      raise ValueError(f"max_intra must be >= 1, got {max_intra}")
    intra = np.minimum(intra, max_intra - 1)
  return intra.astype(np.int32), inter.astype(np.int32)


def flat_positions(doc_ids) -> np.ndarray:
  """Token index within its document, [..., L] int32 (restarts where doc_ids change)."""
  doc_ids = np.asarray(doc_ids)
  idx = np.broadcast_to(np.arange(doc_ids.shape[-1], dtype=np.int64), doc_ids.shape)
  start = np.zeros(doc_ids.shape, dtype=bool)
  start[..., 0] = True
  start[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
  return (idx - first).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class BilevelState:
  """Position state after some prefix of a sequence, for token-by-token decoding.

  `intra`/`inter` are the ids the *next* token will get; `advance(is_sep)` is
  called with whether the token just placed at those ids is a separator.
  """
  intra: int = 0
  inter: int = 0
  max_intra: int | None = None

  def ids(self) -> tuple[int, int]:
    intra = self.intra if self.max_intra is None else min(self.intra, self.max_intra - 1)
    return intra, self.inter

  def advance(self, is_sep: bool) -> "BilevelState":
    if is_sep:
      return dataclasses.replace(self, intra=0, inter=self.inter + 1)
    return dataclasses.replace(self, intra=self.intra + 1)


# Token by token on device, vectorised over a batch (cached decoding) ------------

@dataclasses.dataclass(frozen=True)
class PositionRule:
  """How position ids follow from tokens (what the training pipeline did).

  is_separator: bool [V]; max_intra: intra ids clip to max_intra - 1 (None:
  no clip); bos_id: the token that starts a document; restart_docs: a BOS
  restarts every counter (data.packing "documents"), else ids run on.
  """
  is_separator: np.ndarray
  max_intra: int | None
  bos_id: int
  restart_docs: bool

  @classmethod
  def from_config(cls, config, tokenizer, is_separator) -> "PositionRule":
    return cls(np.asarray(is_separator, bool), int(config.pe.max_intra), int(tokenizer.bos_id),
               config.data.packing != "windows")


class IdState(NamedTuple):
  """Per row [B]: the ids the next token gets unless it starts a document.

  intra (unclipped) / inter as BilevelState; pos: flat index in the document;
  doc: document id.
  """
  intra: jnp.ndarray
  inter: jnp.ndarray
  pos: jnp.ndarray
  doc: jnp.ndarray

  @classmethod
  def start(cls, batch: int) -> "IdState":
    z = jnp.zeros((batch,), jnp.int32)
    return cls(z, z, z, z)


def step_ids(state: IdState, tok_B, valid_B, is_sep_V, rule: PositionRule, pad_doc: int = -1):
  """Ids of one new token per row and the state after it (jnp, jittable).

  tok_B, valid_B: [B]; is_sep_V: bool [V] on device. Returns ({intra, inter,
  positions, doc_ids} of [B] int32, next state). A row with valid False
  (padding, or a row that has stopped) keeps its state and gets document
  `pad_doc`.
  """
  new_doc = (tok_B == rule.bos_id) & rule.restart_docs
  doc = state.doc + new_doc
  fresh = lambda x: jnp.where(new_doc, 0, x)
  intra, inter, pos = fresh(state.intra), fresh(state.inter), fresh(state.pos)
  clipped = intra if rule.max_intra is None else jnp.minimum(intra, rule.max_intra - 1)
  ids = dict(intra=clipped, inter=inter, positions=pos, doc_ids=jnp.where(valid_B, doc, pad_doc))
  # BilevelState.advance: a separator ends its segment.
  sep = is_sep_V[tok_B]
  nxt = IdState(jnp.where(sep, 0, intra + 1), inter + sep, pos + 1, doc)
  nxt = jax.tree.map(lambda n, o: jnp.where(valid_B, n, o), nxt, state)
  return jax.tree.map(lambda x: x.astype(jnp.int32), ids), nxt


def row_ids(state: IdState, tokens_BT, valid_BT, is_sep_V, rule: PositionRule,
            pad_doc: int = -1):
  """`step_ids` over T tokens per row: ({name: [B, T] int32}, state after them)."""
  def body(s, xs):
    ids, s = step_ids(s, xs[0], xs[1], is_sep_V, rule, pad_doc)
    return s, ids
  state, ids = jax.lax.scan(body, state, (tokens_BT.T, valid_BT.T))
  return {k: v.T for k, v in ids.items()}, state
