"""Sources, splits, the cached corpus, training iterators and evaluation blocks."""
import gzip
import json
import logging
import os

from array_record.python import array_record_module
import numpy as np
import pytest

from bipe_jax.data import pipeline, sources
from bipe_jax.configs import base


def config_for(source, cache_dir, **data):
  c = base.get_config()
  c.data.source = source
  c.data.cache_dir = cache_dir
  c.data.seq_len = 16
  c.data.heldout_fraction = 0.2
  c.tokenizer.vocab_size = 400
  c.tokenizer.sample_bytes = 200_000
  c.pe.max_intra = 16
  c.train.batch_size = 4
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


# Sources ------------------------------------------------------------------------

def test_jsonl_and_gz(tmp_path):
  lines = [json.dumps({"text": "a"}), json.dumps({"text": "b\nc", "id": 2}), ""]
  plain = tmp_path / "d.jsonl"
  plain.write_text("\n".join(lines) + "\n")
  packed = tmp_path / "d.jsonl.gz"
  with gzip.open(packed, "wt") as f:
    f.write("\n".join(lines))
  assert list(sources.read_documents(str(plain))) == ["a", "b\nc"]
  assert list(sources.read_documents(str(packed))) == ["a", "b\nc"]
  other = tmp_path / "o.jsonl"
  other.write_text(json.dumps({"body": "x"}) + "\n")
  assert list(sources.read_documents(str(other), text_field="body")) == ["x"]


def test_jsonl_errors_name_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{not json\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
    list(sources.read_documents(str(bad)))
  missing = tmp_path / "missing.jsonl"
  missing.write_text('{"content": "x"}\n')
  with pytest.raises(ValueError, match=r"missing\.jsonl:1: .*'text'.*data.text_field"):
    list(sources.read_documents(str(missing)))
  with pytest.raises(OSError, match="nowhere.txt"):
    list(sources.read_documents(str(tmp_path / "nowhere.txt")))


def test_text_and_invalid_utf8(tmp_path, caplog):
  f = tmp_path / "a.txt"
  f.write_bytes(b"line one\nbad \xff\xfe byte\n")
  with caplog.at_level(logging.WARNING):
    docs = list(sources.read_documents(str(f)))
  assert docs == ["line one\nbad \ufffd\ufffd byte\n"]
  assert "invalid UTF-8" in caplog.text and "2 byte sequence" in caplog.text


def test_array_record(tmp_path):
  path = str(tmp_path / "d.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for rec in [json.dumps({"text": "from json\n"}).encode(), b"raw text\n",
              b"{not json but raw", b"bad \xff"]:
    writer.write(rec)
  writer.close()
  assert list(sources.read_documents(path)) == [
      "from json\n", "raw text\n", "{not json but raw", "bad \ufffd"]
  bad = str(tmp_path / "bad.array_record")
  writer = array_record_module.ArrayRecordWriter(bad, "group_size:1")
  writer.write(json.dumps({"other": 1}).encode())
  writer.close()
  with pytest.raises(ValueError, match="record 0"):
    list(sources.read_documents(bad))


def test_list_files(tmp_path):
  for rel in ["a/x.txt", "a/b/y.txt", "z.jsonl"]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("t")
  got = sources.list_files(f"{tmp_path}/a/**/*.txt, {tmp_path}/z.jsonl")
  assert got == sorted([f"{tmp_path}/a/x.txt", f"{tmp_path}/a/b/y.txt", f"{tmp_path}/z.jsonl"])
  with pytest.raises(ValueError, match=r"nothing\*\.md.*stdlib"):
    sources.list_files(f"{tmp_path}/nothing*.md")


def test_stdlib_files():
  files = sources.stdlib_files()
  assert files == sorted(files) and len(files) > 300
  assert any(f.endswith(os.path.join("json", "decoder.py")) for f in files)
  for f in files:
    parts = set(f.split(os.sep))
    assert not parts & {"test", "tests", "idle_test", "site-packages"}, f


def test_split_is_stable(tmp_path):
  paths = [str(tmp_path / f"f{i}.py") for i in range(40)]
  train, held = sources.split_files(paths, 0.25, root=str(tmp_path))
  assert (train, held) == sources.split_files(paths, 0.25, root=str(tmp_path))
  assert sorted(train + held) == sorted(paths) and 0 < len(held) < 40
  # A new file never moves an old one across the split.
  train2, held2 = sources.split_files(paths + [str(tmp_path / "new.py")], 0.25,
                                      root=str(tmp_path))
  assert set(held) <= set(held2) and set(train) <= set(train2)
  # At least one file held out (and one kept) once there are two.
  assert [len(s) for s in sources.split_files(paths[:2], 0.01, root=str(tmp_path))] == [1, 1]
  assert sources.split_files(paths, 0.0, root=str(tmp_path))[1] == []
  docs = sources.split_documents(100, 0.3, key="d.jsonl")
  np.testing.assert_array_equal(docs[:60], sources.split_documents(60, 0.3, key="d.jsonl"))
  assert 10 < docs.sum() < 50


# make_batch -----------------------------------------------------------------------

def test_make_batch_hand_worked():
  table = np.zeros(20, bool)
  table[12] = True  # Token 12 ends a segment.
  rows = np.array([[10, 11, 12, 13, 14],
                   [10, 12, 11, 3, 3]])
  docs = np.array([[1, 1, 1, 2, 2],
                   [1, 1, 1, 0, 0]])
  valid = docs > 0
  b = pipeline.make_batch(rows, table, 16, doc_ids=docs, valid=valid)
  np.testing.assert_array_equal(b["tokens"], [[10, 11, 12, 13], [10, 12, 11, 3]])
  np.testing.assert_array_equal(b["targets"], [[11, 12, 13, 14], [12, 11, 3, 3]])
  np.testing.assert_array_equal(b["intra"], [[0, 1, 2, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(b["inter"], [[0, 0, 0, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 1, 2, 0]])
  np.testing.assert_array_equal(b["doc_ids"], [[1, 1, 1, 2], [1, 1, 1, 0]])
  np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1], [1, 1, 0, 0]])
  assert {k: v.dtype for k, v in b.items()} == {
      **{k: np.int32 for k in ("tokens", "targets", "intra", "inter", "positions", "doc_ids")},
      "loss_mask": np.float32}
  # No document ids: one document, positions and segments run through.
  b = pipeline.make_batch(rows[:1], table, 2)
  np.testing.assert_array_equal(b["intra"], [[0, 1, 1, 0]])  # Clipped at max_intra - 1.
  np.testing.assert_array_equal(b["inter"], [[0, 0, 0, 1]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3]])
  np.testing.assert_array_equal(b["doc_ids"], [[0, 0, 0, 0]])
  np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 1]])
  with pytest.raises(ValueError, match="shaped like rows"):
    pipeline.make_batch(rows, table, 16, doc_ids=docs[:, 1:])


# The prepared corpus -----------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_config(code_corpus_dir, tmp_path_factory):
  return config_for(f"{code_corpus_dir}/*.py", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def corpus(corpus_config):
  return pipeline.prepare(corpus_config, "unused")


def test_prepare(corpus, code_texts):
  tok = corpus.tokenizer
  assert corpus.vocab_size == 400 and corpus.is_separator.shape == (400,)
  for tokens, starts in ((corpus.train_tokens, corpus.train_doc_starts),
                         (corpus.heldout_tokens, corpus.heldout_doc_starts)):
    assert tokens.dtype == np.int32 and starts.dtype == np.int64
    assert len(starts) >= 1 and starts[0] == 0
    np.testing.assert_array_equal(np.flatnonzero(tokens == tok.bos_id), starts)
  docs = [tok.decode(d) for d in np.split(np.asarray(corpus.train_tokens),
                                          corpus.train_doc_starts[1:])]
  docs += [tok.decode(d) for d in np.split(np.asarray(corpus.heldout_tokens),
                                           corpus.heldout_doc_starts[1:])]
  assert sorted(docs) == sorted(code_texts), "every file is one document, exactly"
  assert corpus.stats["train_documents"] + corpus.stats["heldout_documents"] == len(code_texts)


def test_prepare_reuses_and_invalidates_cache(tmp_path, code_corpus_dir, corpus):
  src = tmp_path / "src"
  src.mkdir()
  for f in sorted(os.listdir(code_corpus_dir))[:4]:
    (src / f).write_text(open(os.path.join(code_corpus_dir, f)).read())
  c = config_for(f"{src}/*.py", "")
  first = pipeline.prepare(c, str(tmp_path / "work"))
  meta = tmp_path / "work" / "data" / "meta.json"
  stamp = meta.stat().st_mtime_ns
  again = pipeline.prepare(c, str(tmp_path / "work"))
  assert meta.stat().st_mtime_ns == stamp, "cache reused"
  np.testing.assert_array_equal(again.train_tokens, first.train_tokens)
  victim = sorted(src.iterdir())[0]
  victim.write_text(victim.read_text() + "\nx = 1\n")
  changed = pipeline.prepare(c, str(tmp_path / "work"))
  assert meta.stat().st_mtime_ns != stamp, "a changed file re-tokenizes"
  total = len(changed.train_tokens) + len(changed.heldout_tokens)
  assert total > len(first.train_tokens) + len(first.heldout_tokens)
  c.data.max_documents = 2
  few = pipeline.prepare(c, str(tmp_path / "work"))
  assert len(few.train_doc_starts) + len(few.heldout_doc_starts) == 2


def test_single_jsonl_splits_documents(tmp_path, code_texts):
  path = tmp_path / "one.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in code_texts * 3))
  c = config_for(str(path), str(tmp_path / "cache"))
  corpus = pipeline.prepare(c, "unused")
  n_train, n_held = len(corpus.train_doc_starts), len(corpus.heldout_doc_starts)
  assert n_train + n_held == 3 * len(code_texts) and n_train > 0 and n_held > 0


def test_empty_corpus_names_the_source(tmp_path, code_tokenizer):
  (tmp_path / "e1.txt").write_text("")
  (tmp_path / "e2.txt").write_text("")
  c = config_for(f"{tmp_path}/*.txt", str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"data.source .*\*\.txt.* produced no"):
    pipeline.prepare(c, "unused")
  c.tokenizer.model = code_tokenizer.model_path  # Fails later, at tokenization.
  with pytest.raises(ValueError, match=r"data.source .*\*\.txt.* produced no documents"):
    pipeline.prepare(c, "unused")


# Training iterators ----------------------------------------------------------

def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("packing", ["windows", "documents"])
def test_iterator_deterministic_and_resumable(corpus_config, corpus, packing):
  c = corpus_config.copy_and_resolve_references()
  c.data.packing = packing
  first = _take(pipeline.train_iterator(c, corpus), 6)
  assert _same(first, _take(pipeline.train_iterator(c, corpus), 6))
  assert not _same(first, _take(pipeline.train_iterator(c, corpus, seed=1), 6))
  for b in first:
    assert all(v.shape == (4, 16) for v in b.values())
  it = pipeline.train_iterator(c, corpus)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  rest = _take(it, 5)
  resumed = pipeline.train_iterator(c, corpus)
  resumed.set_state(state)
  assert _same(rest, _take(resumed, 5)), "set_state resumes at exactly the same batch"


def test_windows_cover_the_stream_once_per_epoch(corpus_config, corpus):
  tokens = np.asarray(corpus.train_tokens)
  length = corpus_config.data.seq_len
  n = (len(tokens) - 1) // length
  it = pipeline.train_iterator(corpus_config, corpus)
  batches = _take(it, -(-n // 4))
  rows = np.concatenate([b["tokens"] for b in batches])[:n]
  targets = np.concatenate([b["targets"] for b in batches])[:n]
  want = sorted(tokens[k * length:(k + 1) * length + 1].tobytes() for k in range(n))
  got = sorted(np.concatenate([r, t[-1:]]).tobytes() for r, t in zip(rows, targets))
  assert got == want, "the first epoch is every window exactly once"
  b = next(it)
  assert (b["doc_ids"] == 0).all() and (b["loss_mask"] == 1).all()
  np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(length), (4, length)))


def test_document_chunks_cover_every_target_once():
  starts, ends = pipeline._document_chunks(np.array([0, 5, 7]), 20, 4)
  np.testing.assert_array_equal(starts, [0, 5, 7, 11, 15])
  np.testing.assert_array_equal(ends, [5, 7, 12, 16, 20])


def test_documents_packing_restarts_and_masks(corpus_config, corpus):
  c = corpus_config.copy_and_resolve_references()
  c.data.packing = "documents"
  tokens = np.asarray(corpus.train_tokens)
  chunk_starts, _ = pipeline._document_chunks(corpus.train_doc_starts, len(tokens), 16)
  for b in _take(pipeline.train_iterator(c, corpus), 10):
    docs = b["doc_ids"]
    change = np.zeros(docs.shape, bool)
    change[:, 1:] = docs[:, 1:] != docs[:, :-1]
    for k in ("intra", "inter", "positions"):
      assert (b[k][change] == 0).all(), f"{k} restarts at every packed document"
    assert (b["loss_mask"][:, :-1][change[:, 1:]] == 0).all(), "no target across documents"
    assert (b["loss_mask"][docs == 0] == 0).all(), "padding is masked"
    assert (b["tokens"][docs == 0] == corpus.tokenizer.pad_id).all()
    for r in range(docs.shape[0]):
      for d in set(docs[r]) - {0}:
        seg = b["tokens"][r][docs[r] == d]
        assert any(np.array_equal(tokens[s:s + len(seg)], seg) for s in chunk_starts), \
            "each packed segment is a chunk of one document"


def test_bad_packing(corpus_config, corpus):
  c = corpus_config.copy_and_resolve_references()
  c.data.packing = "sequences"
  with pytest.raises(ValueError, match=r"windows.*documents"):
    pipeline.train_iterator(c, corpus)


# Evaluation ----------------------------------------------------------------------

def test_eval_blocks(corpus_config, corpus):
  held = np.asarray(corpus.heldout_tokens)
  length = 16
  n = (len(held) - 1) // length
  batches = list(pipeline.eval_batches(corpus_config, corpus, length, 0, 40))
  assert [len(b["tokens"]) for b in batches[:-1]] == [2] * (len(batches) - 1)
  tokens = np.concatenate([b["tokens"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  assert len(tokens) == n, "the remainder is dropped"
  np.testing.assert_array_equal(tokens.reshape(-1), held[:n * length])
  np.testing.assert_array_equal(targets, [held[i * length + 1:(i + 1) * length + 1]
                                          for i in range(n)])
  assert all((b["inter"][:, 0] == 0).all() and (b["intra"][:, 0] == 0).all() for b in batches)
  assert all((b["doc_ids"] == 0).all() for b in batches)
  limited = list(pipeline.eval_batches(corpus_config, corpus, length, 50, 1000))
  assert sum(len(b["tokens"]) for b in limited) == 3
  assert sum(len(b["tokens"]) for b in pipeline.eval_batches(
      corpus_config, corpus, length, 1, 1)) == 1, "always at least one block"


def test_eval_documents_mode_and_clipping(corpus_config, corpus):
  c = corpus_config.copy_and_resolve_references()
  c.data.packing = "documents"
  c.pe.max_intra = 4
  bos = corpus.tokenizer.bos_id
  for b in pipeline.eval_batches(c, corpus, 64, 0, 256):
    assert b["intra"].max() <= 3
    np.testing.assert_array_equal(b["doc_ids"], np.cumsum(b["tokens"] == bos, axis=1))
    assert (b["loss_mask"][b["targets"] == bos] == 0).all()
    assert (b["positions"][b["tokens"] == bos] == 0).all()


def test_eval_too_short(corpus_config, corpus):
  size = len(corpus.heldout_tokens)
  with pytest.raises(ValueError, match=f"{size} tokens.*length {size}"):
    next(pipeline.eval_batches(corpus_config, corpus, size, 0, 1000))


def test_unigram_perplexity():
  assert pipeline.unigram_perplexity(np.array([3, 5, 7, 9] * 10)) == pytest.approx(4.0)
  assert pipeline.unigram_perplexity(np.array([[2, 2], [2, 2]])) == pytest.approx(1.0)
