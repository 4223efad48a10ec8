"""bilevel_ids / flat_positions / BilevelState against a loop written from the spec.

The oracle follows BIPE_METHOD section 1 word for word: inter[t] counts the
separators strictly before t (since the document start), intra[t] is t minus the
first index of t's segment; a separator belongs to the segment it ends.
"""
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from bipe_jax.positions import BilevelState, bilevel_ids, flat_positions


def oracle_1d(sep, max_intra=None, doc_ids=None):
  """Plain-Python intra / inter for one sequence; sep is a list of bools."""
  length = len(sep)
  intra, inter = [], []
  for t in range(length):
    doc_start = 0  # Without document ids the window is one document.
    if doc_ids is not None:
      doc_start = t
      while doc_start > 0 and doc_ids[doc_start - 1] == doc_ids[t]:
        doc_start -= 1
    n_before = sum(1 for s in range(doc_start, t) if sep[s])
    seg_first = doc_start
    for s in range(doc_start, t):
      if sep[s]:
        seg_first = s + 1  # The token after a separator starts the next segment.
    i = t - seg_first
    if max_intra is not None:
      i = min(i, max_intra - 1)
    intra.append(i)
    inter.append(n_before)
  return intra, inter


def oracle(sep, max_intra=None, doc_ids=None):
  """Applies oracle_1d over the leading dims of a [..., L] bool array."""
  sep = np.asarray(sep)
  flat = sep.reshape(-1, sep.shape[-1])
  docs = None if doc_ids is None else np.asarray(doc_ids).reshape(flat.shape)
  out = [oracle_1d(list(r), max_intra, None if docs is None else list(docs[k]))
         for k, r in enumerate(flat)]
  intra = np.array([o[0] for o in out], dtype=np.int64).reshape(sep.shape)
  inter = np.array([o[1] for o in out], dtype=np.int64).reshape(sep.shape)
  return intra, inter


def test_hand_worked_example():
  # a b c| d e| f  (section 1)
  vocab = {"a": 0, "b": 1, "c|": 2, "d": 3, "e|": 4, "f": 5}
  tokens = np.array([vocab[w] for w in "a b c| d e| f".split()])
  table = np.array([False, False, True, False, True, False])
  intra, inter = bilevel_ids(tokens, table)
  np.testing.assert_array_equal(inter, [0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(intra, [0, 1, 2, 0, 1, 0])
  assert intra.dtype == np.int32 and inter.dtype == np.int32
  np.testing.assert_array_equal(oracle([False, False, True, False, True, False]),
                                ([0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 1, 2]))


def test_doc_ids_restart_both_counters():
  sep = np.array([0, 1, 0, 0, 1, 0, 1, 0], bool)
  docs = np.array([0, 0, 0, 1, 1, 1, 1, 2])
  intra, inter = bilevel_ids(sep.astype(np.int32), np.array([False, True]), doc_ids=docs)
  np.testing.assert_array_equal(intra, [0, 1, 0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(inter, [0, 0, 1, 0, 0, 1, 1, 0])


@st.composite
def cases(draw):
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  batch_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
  length = draw(st.integers(1, 40))
  vocab = draw(st.integers(1, 12))
  density = draw(st.floats(0.0, 1.0))
  tokens = rng.integers(0, vocab, size=batch_shape + (length,))
  table = rng.random(vocab) < density
  docs = None
  if draw(st.booleans()):
    # Sorted ids (packed rows) or arbitrary ids: counters restart at every change.
    docs = rng.integers(0, 3, size=tokens.shape)
    if draw(st.booleans()):
      docs = np.sort(docs, axis=-1)
  max_intra = draw(st.one_of(st.none(), st.integers(1, 8)))
  return tokens, table, docs, max_intra


@settings(max_examples=150, deadline=None)
@given(cases())
def test_table_form_matches_oracle(case):
  tokens, table, docs, max_intra = case
  intra, inter = bilevel_ids(tokens, table, max_intra, docs)
  want_intra, want_inter = oracle(table[tokens], max_intra, docs)
  np.testing.assert_array_equal(intra, want_intra)
  np.testing.assert_array_equal(inter, want_inter)
  assert intra.shape == tokens.shape and inter.shape == tokens.shape


@settings(max_examples=100, deadline=None)
@given(cases())
def test_per_token_mask_form_matches_table_form(case):
  tokens, table, docs, max_intra = case
  mask = table[tokens]
  got = bilevel_ids(tokens, mask, max_intra, docs, per_token=True)
  want = oracle(mask, max_intra, docs)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  if tokens.ndim > 1:  # Inferred from the shape when unambiguous.
    auto = bilevel_ids(tokens, mask, max_intra, docs)
    np.testing.assert_array_equal(auto[0], want[0])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_flat_positions(seed, length):
  docs = np.sort(np.random.default_rng(seed).integers(0, 4, size=(2, length)), axis=-1)
  got = flat_positions(docs)
  for row, g in zip(docs, got):
    want = [t - min(s for s in range(t + 1) if all(row[u] == row[t] for u in range(s, t + 1)))
            for t in range(length)]
    np.testing.assert_array_equal(g, want)
  assert got.dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(cases())
def test_bilevel_state_advance_matches_whole_sequence(case):
  tokens, table, _, max_intra = case
  row = tokens.reshape(-1, tokens.shape[-1])[0]
  intra, inter = bilevel_ids(row, table, max_intra)
  state = BilevelState(max_intra=max_intra)
  for t, tok in enumerate(row):
    assert state.ids() == (intra[t], inter[t]), f"token {t}"
    state = state.advance(bool(table[tok]))


def test_errors():
  with pytest.raises(ValueError, match="vocabulary size"):
    bilevel_ids(np.array([0, 5]), np.zeros(3, bool))
  with pytest.raises(TypeError, match="boolean"):
    bilevel_ids(np.array([0, 1]), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="max_intra"):
    bilevel_ids(np.array([0, 1]), np.zeros(3, bool), max_intra=0)
