"""K-level position ids: level_ids, LevelSeparators.classes and LevelState against
plain-Python oracles, and K = 2 against bilevel_ids.

The id oracle builds the nesting explicitly: a document is cut into units of
the outermost level, each of those into units of the next finer level, and so
on down to tokens; a token's id at level j is the index of its level-j unit
among the units of its level-(j+1) unit. The class oracle reads the text.
"""
import numpy as np
import pytest

from bipe_jax.positions import (BilevelState, LevelSeparators, LevelState, bilevel_ids,
                                level_ids)


def _cut(items, ends):
  """Consecutive pieces of `items`, each ending after an item for which `ends` holds."""
  out, cur = [], []
  for x in items:
    cur.append(x)
    if ends(x):
      out.append(cur)
      cur = []
  return out + ([cur] if cur else [])


def oracle_ids(classes, levels, max_ids=(), doc_ids=None):
  """[K, L] ids of one row, by nesting units explicitly."""
  n = len(classes)
  docs = [0] * n if doc_ids is None else list(doc_ids)
  out = np.zeros((levels, n), np.int64)
  toks = list(range(n))
  for doc in _cut(toks, lambda t: t + 1 < n and docs[t + 1] != docs[t]):

    def assign(units, level):
      # `units` are the level-`level` units of one level-(level+1) unit.
      for k, unit in enumerate(units):
        for t in unit:
          out[level, t] = k
        if level > 0:
          assign(_cut(unit, lambda t: classes[t] >= level - 1), level - 1)
    assign(_cut(doc, lambda t: classes[t] >= levels - 1), levels - 1)
  for j, m in enumerate(max_ids):
    if m is not None:
      out[j] = np.minimum(out[j], m - 1)
  return out


def test_hand_worked_example():
  # a b c| d e| || f g| h : "|" ends a line, "||" (the newline of a blank line) a block.
  classes = [0, 0, 1, 0, 1, 2, 0, 1, 0]
  ids = level_ids(classes, 3)
  np.testing.assert_array_equal(ids, [[0, 1, 2, 0, 1, 0, 0, 1, 0],
                                      [0, 0, 0, 1, 1, 2, 0, 0, 1],
                                      [0, 0, 0, 0, 0, 0, 1, 1, 1]])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(oracle_ids(classes, 3), ids)
  # Two levels: "||" is one more line end.
  np.testing.assert_array_equal(level_ids(np.minimum(classes, 1), 2),
                                [[0, 1, 2, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 2, 3, 3, 4]])


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_level_ids_match_oracle_on_random_rows(levels):
  rng = np.random.default_rng(levels)
  for trial in range(60):
    b, n = 3, int(rng.integers(1, 40))
    # Higher classes rarer, as in text.
    classes = rng.choice(levels, (b, n), p=np.r_[0.6, np.full(levels - 1, 0.4 / (levels - 1))])
    docs = np.cumsum(rng.random((b, n)) < 0.1, axis=1) if trial % 2 else None
    max_ids = [int(rng.integers(1, 5)) if rng.random() < 0.7 else None
               for _ in range(levels - 1)] if trial % 3 else ()
    got = level_ids(classes, levels, max_ids, docs)
    for r in range(b):
      want = oracle_ids(list(classes[r]), levels, max_ids, None if docs is None else docs[r])
      np.testing.assert_array_equal(got[:, r], want, err_msg=f"row {classes[r]} docs "
                                    f"{None if docs is None else docs[r]} clip {max_ids}")


def test_two_levels_equal_bilevel_ids():
  rng = np.random.default_rng(1)
  for trial in range(50):
    table = rng.random(12) < 0.3
    tokens = rng.integers(0, 12, (4, int(rng.integers(1, 50))))
    docs = np.cumsum(rng.random(tokens.shape) < 0.1, axis=1) if trial % 2 else None
    max_intra = int(rng.integers(1, 8)) if trial % 3 else None
    intra, inter = bilevel_ids(tokens, table, max_intra, docs)
    ids = level_ids(LevelSeparators.of(table).classes(tokens), 2, max_intra, docs)
    np.testing.assert_array_equal(ids[0], intra)
    np.testing.assert_array_equal(ids[1], inter)


# Piece texts of a toy vocabulary; id 0 is a control piece (BOS).
TEXTS = ["", "a", "b.", " ", "  ", "\n", "\n\n", "x\n", " \n", "\n\n\n", "c", "\t"]
FINEST = np.array([("\n" in t) or t.endswith(".") for t in TEXTS])


def oracle_class(texts, levels):
  """Class of the last piece of `texts` (one document's pieces up to it), from the text."""
  last = texts[-1]
  if "\n" not in last:
    return int(last.endswith("."))
  # Control pieces are visible here, so they break a blank line as real text does.
  text = "".join(t or "\x00" for t in texts)
  run = 0
  while text.endswith("\n"):  # Count line ends separated by whitespace only.
    run += 1
    text = text[:-1].rstrip(" \t")
  return max(1, min(run, levels - 1))


def _random_rows(rng, b, n):
  # Newline and space pieces often, so that blank-line runs occur.
  p = np.array([1, 3, 2, 2, 1, 4, 2, 2, 2, 1, 3, 1], float)
  return rng.choice(len(TEXTS), (b, n), p=p / p.sum())


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_classes_match_text_oracle(levels):
  seps = LevelSeparators.from_texts(levels, TEXTS, FINEST)
  rng = np.random.default_rng(7)
  tokens = _random_rows(rng, 40, 30)
  docs = np.cumsum(rng.random(tokens.shape) < 0.08, axis=1)
  for with_docs in (False, True):
    got = seps.classes(tokens, docs if with_docs else None)
    for r, row in enumerate(tokens):
      for t in range(len(row)):
        first = 0
        if with_docs:
          while first < t and docs[r, first] != docs[r, t]:
            first += 1
        want = oracle_class([TEXTS[i] for i in row[first:t + 1]], levels)
        assert got[r, t] == want, (levels, [TEXTS[i] for i in row[first:t + 1]])


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_level_state_matches_vectorised(levels):
  seps = LevelSeparators.from_texts(levels, TEXTS, FINEST)
  rng = np.random.default_rng(3)
  tokens = _random_rows(rng, 20, 40)
  docs = np.cumsum(rng.random(tokens.shape) < 0.05, axis=1)
  max_ids = (5, 3, None)[:levels - 1]
  want = level_ids(seps.classes(tokens, docs), levels, max_ids, docs)
  for r, row in enumerate(tokens):
    state = None
    for t, token in enumerate(row):
      if t == 0 or docs[r, t] != docs[r, t - 1]:
        state = LevelState.start(levels, max_ids)  # A new document starts fresh.
      assert state.ids() == tuple(want[:, r, t]), (r, t)
      state = state.step(int(token), seps)


def test_two_level_state_equals_bilevel_state():
  table = np.array([False, True, False, True])
  seps = LevelSeparators.of(table)
  a, b = LevelState.start(2, 3), BilevelState(max_intra=3)
  for token in np.random.default_rng(0).integers(0, 4, 100):
    assert a.ids() == b.ids()
    a, b = a.step(int(token), seps), b.advance(bool(table[token]))


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\)"):
    level_ids([0, 3], 3)
  with pytest.raises(ValueError, match="at most 2"):
    level_ids([0, 1], 3, (4, 4, 4))
  with pytest.raises(ValueError, match="levels must be >= 2"):
    level_ids([0], 1)
  with pytest.raises(ValueError, match="doc_ids"):
    level_ids([0, 1], 2, doc_ids=[0])
  with pytest.raises(ValueError, match="token ids must lie"):
    LevelSeparators.from_texts(3, TEXTS, FINEST).classes([0, 99])
