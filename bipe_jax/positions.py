"""Bilevel and K-level position ids (BIPE_METHOD section 1), computed in the input pipeline.

A separator token ends a segment and belongs to the segment it ends. For token t:
  inter[t] = number of separators strictly before t (segment index),
  intra[t] = t - first index of t's segment (position inside the segment),
both restarting at every document start when `doc_ids` are given.

K levels generalise this (`level_ids`): every token has a class c in 0..K-1
(`LevelSeparators.classes`); a token of class c >= 1 ends a unit of level c and
of every finer level (a blank line ends a line and a block). Id j of a token
counts the level-j units before it inside its level-(j+1) unit (level 0 units
are tokens), and the outermost id counts the level-(K-1) units of its document.
With K = 2 this is (intra, inter) exactly.

The same rules, one token at a time, are `BilevelState.advance` and
`LevelState.step`; `step_ids` is the bilevel rule in jnp for a batch of rows
at once, with the pipeline's document restarts, and cached decoding
(bipe_jax.decode) runs it on device, so the pipeline and generation can never
disagree (tests check it against `bilevel_ids` on whole rows).
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
    _check_ids(tokens, is_separator.shape[0])
    sep = is_separator[tokens]

  length = tokens.shape[-1]
  idx = np.broadcast_to(np.arange(length, dtype=np.int64), tokens.shape)
  # A segment starts at index 0, after a separator, and at a document start.
  starts = np.zeros(tokens.shape, dtype=bool)
  starts[..., 0] = True
  starts[..., 1:] = sep[..., :-1]
  doc_start = _doc_starts(doc_ids, tokens.shape)
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
  idx = _index(doc_ids.shape)
  return (idx - _last(_doc_starts(doc_ids, doc_ids.shape), idx)).astype(np.int32)


def _check_ids(tokens, vocab_size: int) -> None:
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(
        f"token ids must lie in [0, {vocab_size}) (the separator table's "
        f"vocabulary size); got [{tokens.min()}, {tokens.max()}]")


def _index(shape) -> np.ndarray:
  return np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape)


def _last(mask, idx) -> np.ndarray:
  """Index of the last True at or before each position (0 where none)."""
  return np.maximum.accumulate(np.where(mask, idx, 0), axis=-1)


def _doc_starts(doc_ids, shape) -> np.ndarray:
  """bool [..., L]: True at index 0 and wherever the document id changes."""
  start = np.zeros(shape, dtype=bool)
  start[..., 0] = True
  if doc_ids is not None:
    doc_ids = np.asarray(doc_ids)
    if doc_ids.shape != tuple(shape):
      raise ValueError(f"doc_ids {doc_ids.shape} must be shaped like tokens {tuple(shape)}")
    start[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
  return start


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


def level_ids(classes, levels: int, max_ids=None, doc_ids=None) -> np.ndarray:
  """K-level position ids from per-token separator classes.

  Args:
    classes: int array [..., L] in [0, levels): 0 for a token that ends no
      unit, c >= 1 for one that ends a unit of level c and of every finer one
      (see `LevelSeparators.classes`).
    levels: K >= 2.
    max_ids: optional sequence of K-1 clip bounds for the inner levels, finest
      first (id j clips to max_ids[j] - 1; None: no clipping of that level),
      or one int for the finest level alone. The outermost level never clips.
    doc_ids: optional int array like `classes`; every counter restarts where
      the document id changes.

  Returns:
    int32 [K, ..., L], finest first: ids[0] is the position inside the finest
    unit (intra), ids[K-1] the index of the coarsest unit in the document
    (inter). ids[j] counts the tokens of class >= j before t since the start of
    t's level-(j+1) unit (every token has class >= 0).
  """
  classes = np.asarray(classes)
  if not np.issubdtype(classes.dtype, np.integer):
    raise TypeError(f"classes must be integers, got {classes.dtype}")
  if levels < 2:
    raise ValueError(f"levels must be >= 2, got {levels}")
  if classes.size and (classes.min() < 0 or classes.max() >= levels):
    raise ValueError(f"separator classes must lie in [0, {levels}) for {levels} "
                     f"levels; got [{classes.min()}, {classes.max()}]")
  bounds = _bounds(max_ids, levels)
  idx = _index(classes.shape)
  doc_start = _doc_starts(doc_ids, classes.shape)
  out = np.empty((levels,) + classes.shape, dtype=np.int32)
  for j in range(levels):  # One vectorised pass per level, never per token.
    ends = classes >= j
    before = np.cumsum(ends, axis=-1, dtype=np.int64) - ends
    starts = doc_start.copy()
    if j + 1 < levels:  # A level-(j+1) unit starts after a token of class >= j+1.
      starts[..., 1:] |= classes[..., :-1] > j
    ids = before - np.take_along_axis(before, _last(starts, idx), axis=-1)
    out[j] = ids if bounds[j] is None else np.minimum(ids, bounds[j] - 1)
  return out


def _bounds(max_ids, levels: int) -> list:
  """One clip bound (or None) per level, the outermost None."""
  if max_ids is None or isinstance(max_ids, (int, np.integer)):
    max_ids = [max_ids]
  max_ids = list(max_ids)
  if len(max_ids) > levels - 1:
    raise ValueError(f"{len(max_ids)} clip bounds for {levels} levels: give at most "
                     f"{levels - 1}, one per inner level (the outermost never clips)")
  for m in max_ids:
    if m is not None and m < 1:
      raise ValueError(f"clip bounds must be >= 1, got {max_ids}")
  return max_ids + [None] * (levels - len(max_ids))


@dataclasses.dataclass(frozen=True, eq=False)
class LevelSeparators:
  """Which tokens end a unit of which of K levels, from per-piece tables [V].

  piece_class: int8 [V], the class a piece has on its own (0: ends nothing;
    c: ends a unit of level c and of every finer one).
  newlines, blank_lead, space: optional piece tables enabling the blank-line
    rule: `newlines` int [V] counts "\\n" in each piece, `blank_lead` bool [V]
    says the piece's text before its first newline is whitespace only, and
    `space` bool [V] marks non-empty whitespace-only pieces without a newline.
    A newline piece that ends a blank line (the previous non-space token of the
    document is a newline piece and nothing but whitespace comes between) or
    holds two newlines extends a run of n line ends; the piece that ends a run
    of n line ends (n - 1 blank lines) gets class min(n, K-1): with K = 3 a
    blank line ends a block, with K = 4 two blank lines end a section.
  """
  levels: int
  piece_class: np.ndarray
  newlines: np.ndarray | None = None
  blank_lead: np.ndarray | None = None
  space: np.ndarray | None = None

  def __post_init__(self):
    if self.levels < 2:
      raise ValueError(f"levels must be >= 2, got {self.levels}")
    pc = np.asarray(self.piece_class)
    if pc.ndim != 1 or pc.size and (pc.min() < 0 or pc.max() >= self.levels):
      raise ValueError(f"piece_class must be a [V] table of classes in [0, {self.levels})")
    object.__setattr__(self, "piece_class", pc.astype(np.int8))

  @classmethod
  def of(cls, separators) -> "LevelSeparators":
    """A LevelSeparators as it is, or the two levels of a bool [V] table."""
    if isinstance(separators, LevelSeparators):
      return separators
    table = np.asarray(separators)
    if table.dtype != np.bool_ or table.ndim != 1:
      raise TypeError("separators must be a LevelSeparators or a bool [V] table")
    return cls(2, table.astype(np.int8))

  @classmethod
  def from_texts(cls, levels: int, texts, finest) -> "LevelSeparators":
    """The blank-line rule over piece texts [V] ("" for control pieces), with
    `finest` bool [V] the pieces that end a unit of level 1 on their own."""
    finest = np.asarray(finest, bool)
    newlines = np.array([t.count("\n") for t in texts], np.int32)
    if len(newlines) != len(finest):
      raise ValueError(f"{len(texts)} piece texts for a table of {len(finest)} pieces")
    blank_lead = np.array([not t.split("\n", 1)[0].strip() for t in texts], bool)
    space = np.array([bool(t) and not t.strip() and "\n" not in t for t in texts], bool)
    return cls(levels, finest.astype(np.int8), newlines, blank_lead, space)

  @property
  def vocab_size(self) -> int:
    return len(self.piece_class)

  @property
  def is_separator(self) -> np.ndarray:
    """bool [V]: pieces that end a unit of the finest level on their own."""
    return self.piece_class > 0

  def classes(self, tokens, doc_ids=None) -> np.ndarray:
    """int8 [..., L] separator class of each token of `tokens` [..., L].

    The blank-line rule looks back only within the row and within a document
    (`doc_ids` like `tokens`), as the ids themselves do.
    """
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
      raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    _check_ids(tokens, self.vocab_size)
    cls = self.piece_class[tokens]
    if self.newlines is None or self.levels < 3:
      return cls
    count = self.newlines[tokens].astype(np.int64)
    nl = count > 0
    idx = _index(tokens.shape)
    # The previous non-space token of the same document (-1: none).
    prev = np.full(tokens.shape, -1, np.int64)
    prev[..., 1:] = np.maximum.accumulate(
        np.where(self.space[tokens], -1, idx), axis=-1)[..., :-1]
    prev = np.where(prev >= _last(_doc_starts(doc_ids, tokens.shape), idx), prev, -1)
    prev_nl = (prev >= 0) & np.take_along_axis(nl, np.maximum(prev, 0), axis=-1)
    extends = nl & self.blank_lead[tokens] & prev_nl
    # A run of line ends starts at a newline piece that extends none; only
    # space tokens (no newlines) lie between the pieces of one run.
    total = np.cumsum(count, axis=-1)
    head = _last(nl & ~extends, idx)
    run = total - np.take_along_axis(total - count, head, axis=-1)
    raised = np.minimum(run, self.levels - 1).astype(np.int8)
    return np.where(nl, np.maximum(cls, raised), cls)

  def next_class(self, token: int, run: int) -> tuple[int, int]:
    """(class, run after it) of `token` following a run of `run` line ends
    (0: the last non-space token ended none): `classes` one token at a time."""
    cls = int(self.piece_class[token])
    if self.newlines is None or self.levels < 3:
      return cls, 0
    if self.space[token]:
      return cls, run
    count = int(self.newlines[token])
    if not count:
      return cls, 0
    run = count + (run if self.blank_lead[token] else 0)
    return max(cls, min(run, self.levels - 1)), run


@dataclasses.dataclass(frozen=True)
class LevelState:
  """K-level position state after a prefix of one document, for decoding.

  `counts` are the ids the *next* token gets, finest first and unclipped;
  `ids()` clips them by `max_ids` (one bound per inner level, as `level_ids`).
  `run` is the blank-line context `LevelSeparators.next_class` needs.
  """
  counts: tuple[int, ...] = (0, 0)
  max_ids: tuple = ()
  run: int = 0

  @classmethod
  def start(cls, levels: int, max_ids=()) -> "LevelState":
    return cls((0,) * levels, tuple(_bounds(max_ids, levels)[:-1]))

  def ids(self) -> tuple[int, ...]:
    bounds = _bounds(self.max_ids, len(self.counts))
    return tuple(c if m is None else min(c, m - 1) for c, m in zip(self.counts, bounds))

  def advance(self, cls: int) -> "LevelState":
    """After a token of class `cls`: the finer counters restart, level `cls` counts one more."""
    counts = (0,) * cls + (self.counts[cls] + 1,) + self.counts[cls + 1:]
    return dataclasses.replace(self, counts=counts)

  def step(self, token: int, separators: LevelSeparators) -> "LevelState":
    """After `token`: its class from `separators` (with the blank-line context), then advance."""
    cls, run = separators.next_class(token, self.run)
    return dataclasses.replace(self.advance(cls), run=run)


# Token by token on device, vectorised over a batch (cached decoding) ------------

@dataclasses.dataclass(frozen=True, eq=False)
class PositionRule:
  """How position ids follow from tokens (what the training pipeline did).

  separators: a bool [V] table (two levels) or a LevelSeparators (K levels);
  max_ids: clip bounds of the inner levels as `level_ids` takes them (an int:
  intra only; None: no clip); bos_id: the token that starts a document;
  restart_docs: a BOS restarts every counter (data.packing "documents"),
  else ids run on across documents.
  """
  separators: LevelSeparators | np.ndarray
  max_ids: object
  bos_id: int
  restart_docs: bool

  def __post_init__(self):
    object.__setattr__(self, "separators", LevelSeparators.of(self.separators))
    object.__setattr__(self, "max_ids", tuple(_bounds(self.max_ids, self.levels)))

  @property
  def levels(self) -> int:
    return self.separators.levels

  def tables(self) -> dict:
    """The per-piece tables `step_ids` reads, as arrays to put on device."""
    s = self.separators
    out = {"piece_class": s.piece_class.astype(np.int32)}
    if s.newlines is not None and s.levels > 2:
      out.update(newlines=np.asarray(s.newlines, np.int32),
                 blank_lead=np.asarray(s.blank_lead, bool), space=np.asarray(s.space, bool))
    return out


class IdState(NamedTuple):
  """Per row: the counters the next token gets unless it starts a document.

  counts [K, B] finest first, unclipped (as LevelState.counts; with two
  levels BilevelState's intra and inter); run [B] the blank-line context of
  LevelSeparators.next_class; pos [B] flat index in the document; doc [B].
  """
  counts: jnp.ndarray
  run: jnp.ndarray
  pos: jnp.ndarray
  doc: jnp.ndarray

  @classmethod
  def start(cls, batch: int, levels: int = 2) -> "IdState":
    z = jnp.zeros((batch,), jnp.int32)
    return cls(jnp.zeros((levels, batch), jnp.int32), z, z, z)


def step_ids(state: IdState, tok_B, valid_B, tables: dict, rule: PositionRule,
             pad_doc: int = -1):
  """Ids of one new token per row and the state after it (jnp, jittable).

  tok_B, valid_B: [B]; tables: `rule.tables()` on device. Returns ({intra,
  inter, positions, doc_ids: [B] int32; levels: [B, K-2] with K > 2}, next
  state). A row with valid False (padding, or a row that has stopped) keeps
  its state and gets document `pad_doc`.
  """
  k = rule.levels
  new_doc = (tok_B == rule.bos_id) & rule.restart_docs
  fresh = lambda x: jnp.where(new_doc, 0, x)
  counts, run, pos = fresh(state.counts), fresh(state.run), fresh(state.pos)
  doc = state.doc + new_doc
  ids_KB = jnp.stack([c if m is None else jnp.minimum(c, m - 1)
                      for c, m in zip(counts, rule.max_ids)])
  ids = dict(intra=ids_KB[0], inter=ids_KB[-1], positions=pos,
             doc_ids=jnp.where(valid_B, doc, pad_doc))
  if k > 2:
    ids["levels"] = ids_KB[1:-1].T
  # LevelSeparators.next_class, then LevelState.advance (BilevelState's with K = 2).
  cls = tables["piece_class"][tok_B]
  if "newlines" in tables:
    n_nl, space = tables["newlines"][tok_B], tables["space"][tok_B]
    ends = ~space & (n_nl > 0)
    run_next = jnp.where(space, run, jnp.where(
        ends, n_nl + jnp.where(tables["blank_lead"][tok_B], run, 0), 0))
    cls = jnp.where(ends, jnp.maximum(cls, jnp.minimum(run_next, k - 1)), cls)
  else:
    run_next = run
  level_K1 = jnp.arange(k)[:, None]
  counts_next = jnp.where(level_K1 < cls, 0, counts + (level_K1 == cls))
  nxt = IdState(counts_next, run_next, pos + 1, doc)
  nxt = jax.tree.map(lambda n, o: jnp.where(valid_B, n, o), nxt, state)
  return jax.tree.map(lambda x: x.astype(jnp.int32), ids), nxt


def row_ids(state: IdState, tokens_BT, valid_BT, tables: dict, rule: PositionRule,
            pad_doc: int = -1):
  """`step_ids` over T tokens per row: ({name: [B, T] int32, levels [B, K-2, T]},
  state after them)."""
  def body(s, xs):
    ids, s = step_ids(s, xs[0], xs[1], tables, rule, pad_doc)
    return s, ids
  state, ids = jax.lax.scan(body, state, (tokens_BT.T, valid_BT.T))
  return {k: jnp.moveaxis(v, 0, -1) for k, v in ids.items()}, state
