"""The line-preserving tokenizer: round trip, piece shapes, separator tables, errors."""
import os

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from bipe_jax.data import tokenizer as tokenizer_lib
from bipe_jax.positions import bilevel_ids

TRICKY = [
    "",
    "x",
    "def f(a,\tb):\n\treturn a  +   b\n",
    "\n\n\nleading newlines, trailing spaces   \n   \n",
    "  indented\n        deeper\n\n\n\tTAB\t\t\n",
    "no final newline",
    "unicode: h\u00e9llo \u2713 \u65e5\u672c\u8a9e \U0001F600\n",
    "windows\r\nline ends\r\n",
    "a literal stand-in \u2424 and a private-use \ue000 char\n",
]


def test_round_trip_exact(code_tokenizer, code_texts):
  for text in TRICKY + code_texts:
    ids = code_tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert code_tokenizer.decode(ids) == text, repr(text[:80])
  batch = code_tokenizer.encode_batch(TRICKY)
  assert [code_tokenizer.decode(b) for b in batch] == TRICKY
  for one, many in zip((code_tokenizer.encode(t) for t in TRICKY), batch):
    np.testing.assert_array_equal(one, many)


def test_our_model_is_recognised_after_loading(code_tokenizer):
  assert code_tokenizer.standin == "\u2424"
  again = tokenizer_lib.Tokenizer.load(code_tokenizer.model_path)
  assert again.standin == code_tokenizer.standin
  text = "if x:\n    y = 1\n"
  np.testing.assert_array_equal(again.encode(text), code_tokenizer.encode(text))
  assert code_tokenizer.vocab_size == 400
  assert code_tokenizer.bos_id == 1 and code_tokenizer.pad_id == 3


def test_no_piece_spans_a_line_end(code_tokenizer):
  texts = code_tokenizer.piece_texts()
  assert len(texts) == code_tokenizer.vocab_size
  assert any(t == "\n" for t in texts), "the newline itself must be a piece"
  assert any(t.endswith("\n") and len(t) > 1 for t in texts), "some piece ends a line"
  for i, t in enumerate(texts):
    assert "\n" not in t.rstrip("\n"), f"piece {i} {t!r} has a newline before its end"
  tokenizer_lib.check_no_inner_newline(code_tokenizer)


def test_piece_texts_map_specials(code_tokenizer):
  texts = code_tokenizer.piece_texts()
  sp = code_tokenizer.sp
  assert texts[sp.piece_to_id("<0x0A>")] == "\n"
  assert texts[sp.piece_to_id("<0x41>")] == "A"
  assert texts[code_tokenizer.bos_id] == ""
  assert all("\u2581" not in t and "\u2424" not in t for t in texts)


def test_code_separators_are_exactly_newline_pieces(code_tokenizer):
  table = code_tokenizer.separator_table("code")
  texts = code_tokenizer.piece_texts()
  assert table.dtype == np.bool_ and table.shape == (code_tokenizer.vocab_size,)
  np.testing.assert_array_equal(table, ["\n" in t for t in texts])


def test_each_line_ends_in_one_separator(code_tokenizer, code_texts):
  # Non-blank ASCII lines, so per-piece texts add up to character offsets.
  lines = [l for t in code_texts for l in t.split("\n") if l.strip() and l.isascii()][:400]
  text = "\n".join(lines) + "\n"
  ids = code_tokenizer.encode(text)
  table = code_tokenizer.separator_table("code")
  texts = code_tokenizer.piece_texts()
  ends = np.cumsum([len(texts[i]) for i in ids])
  newline_ends = {k + 1 for k, ch in enumerate(text) if ch == "\n"}
  sep_positions = np.flatnonzero(table[ids])
  assert len(sep_positions) == len(lines), "one separator per line"
  assert {int(ends[p]) for p in sep_positions} == newline_ends, \
      "every separator piece ends exactly at a line end"
  # So inter counts lines: the first token of line k has inter == k.
  _, inter = bilevel_ids(ids, table)
  first_tokens = np.concatenate([[0], sep_positions[:-1] + 1])
  np.testing.assert_array_equal(inter[first_tokens], np.arange(len(lines)))


def test_text_and_cot_modalities(code_tokenizer):
  texts = code_tokenizer.piece_texts()
  code = code_tokenizer.separator_table("code")
  text = code_tokenizer.separator_table("text")
  assert (text >= code).all()
  want = [("\n" in t) or t.rstrip().endswith((".", "!", "?")) for t in texts]
  np.testing.assert_array_equal(text, want)
  assert text[code_tokenizer.sp.piece_to_id("<0x2E>")], "the byte '.' ends a sentence"
  cot = code_tokenizer.separator_table("cot", cot_delimiter=":")
  np.testing.assert_array_equal(cot, [("\n" in t) or (":" in t) for t in texts])


def test_explicit_ids_override(code_tokenizer):
  table = code_tokenizer.separator_table("code", explicit_ids=(13, 200))
  assert table.sum() == 2 and table[13] and table[200]


def test_separator_errors(code_tokenizer):
  with pytest.raises(ValueError, match="modality must be one of"):
    code_tokenizer.separator_table("speech")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    code_tokenizer.separator_table("code", explicit_ids=(400,))


@pytest.fixture(scope="module")
def foreign_tokenizer(tmp_path_factory):
  """A plain SentencePiece model (dummy prefix, no byte fallback, no newlines)."""
  prefix = str(tmp_path_factory.mktemp("foreign") / "m")
  words = ["alpha beta gamma", "delta epsilon", "beta gamma delta zeta"] * 30
  spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=prefix,
                                 vocab_size=30, model_type="bpe", minloglevel=2)
  return tokenizer_lib.Tokenizer.load(prefix + ".model")


def test_foreign_model_used_as_is(foreign_tokenizer):
  assert foreign_tokenizer.standin is None
  ids = foreign_tokenizer.encode("beta gamma")
  assert list(ids) == foreign_tokenizer.sp.encode("beta gamma")
  assert foreign_tokenizer.decode(ids) == "beta gamma"
  assert foreign_tokenizer.piece_texts()[foreign_tokenizer.sp.piece_to_id("\u2581beta")] == " beta"


def test_empty_table_suggests_separator_ids(foreign_tokenizer):
  with pytest.raises(ValueError, match="segmentation.separator_ids"):
    foreign_tokenizer.separator_table("code")


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    tokenizer_lib.Tokenizer.load(str(bad))


def test_training_errors(tmp_path, code_texts):
  with pytest.raises(ValueError, match="too small"):
    tokenizer_lib.train_tokenizer(code_texts, str(tmp_path / "t"), 262)
  with pytest.raises(ValueError, match="empty"):
    tokenizer_lib.train_tokenizer(["", ""], str(tmp_path / "t"), 300)


def test_tiny_vocabulary_falls_back_to_bytes(tmp_path, code_texts):
  tok = tokenizer_lib.train_tokenizer(code_texts, str(tmp_path / "t"), 300)
  assert tok.vocab_size == 300
  again = tokenizer_lib.train_tokenizer(code_texts, str(tmp_path / "u"), 300)
  assert again.file_hash() == tok.file_hash(), "training is reproducible byte for byte"
  for text in code_texts[:3] + TRICKY:
    assert tok.decode(tok.encode(text)) == text


def _config(**tokenizer):
  c = ml_collections.ConfigDict({
      "data": {"source": "somewhere"},
      "tokenizer": {"model": "", "vocab_size": 350, "sample_bytes": 50_000}})
  c.tokenizer.update(tokenizer)
  return c


def test_load_or_train_caches_and_retrains(tmp_path, code_texts):
  calls = []

  def sample():
    calls.append(1)
    return iter(code_texts)

  cache = str(tmp_path / "cache")
  tok = tokenizer_lib.load_or_train(_config(), cache, sample)
  assert tok.vocab_size == 350 and len(calls) == 1
  assert tok.model_path == os.path.join(cache, "tokenizer.model")
  again = tokenizer_lib.load_or_train(_config(), cache, sample)
  assert len(calls) == 1, "a cached tokenizer of the same recipe is reused"
  assert again.file_hash() == tok.file_hash()
  other = tokenizer_lib.load_or_train(_config(vocab_size=330), cache, sample)
  assert other.vocab_size == 330 and len(calls) == 2
  given = tokenizer_lib.load_or_train(_config(model=other.model_path), str(tmp_path / "x"),
                                      sample)
  assert given.file_hash() == other.file_hash() and len(calls) == 2
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.load_or_train(_config(model=str(tmp_path / "nope.model")), cache, sample)


def test_sample_bytes_limits_training_text(tmp_path, code_texts, monkeypatch):
  seen = []
  real = tokenizer_lib.train_tokenizer

  def spy(texts, prefix, vocab_size):
    seen.extend(texts)
    return real(texts, prefix, vocab_size)

  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", spy)
  tokenizer_lib.load_or_train(_config(sample_bytes=20_000), str(tmp_path), lambda: iter(code_texts))
  assert 0 < sum(len(t.encode()) for t in seen) <= 20_000
