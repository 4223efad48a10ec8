"""A researcher's own corpus and bipe-eval inputs: damaged or packed data files,
a byte-order mark, `--source` of another corpus and lengths the held-out split
cannot fill. Bad input ends with exit status 2 and one line `error: ...` naming
the file or flag, and leaves what is saved untouched.
"""
import gzip
import json
import os
import zipfile

from bipe_jax.data import pipeline, sources
from bipe_jax.data.tokenizer import Tokenizer
from test_cli import _assert_one_named_error, _drive
from tiny import STDLIB, cli_args, tiny_config


def _code(name: str) -> bytes:
  with open(os.path.join(STDLIB, name), "rb") as f:
    return f.read()


def test_damaged_gzip_and_packed_files_exit_2_naming_the_file(tmp_path):
  jsonl = b"".join(json.dumps({"text": _code(n).decode()}).encode() + b"\n"
                   for n in ("textwrap.py", "heapq.py", "bisect.py"))
  packed = gzip.compress(jsonl)
  (tmp_path / "truncated.jsonl.gz").write_bytes(packed[:len(packed) // 2])
  damaged = bytearray(packed)
  damaged[20:28] = b"\xff" * 8
  (tmp_path / "damaged.jsonl.gz").write_bytes(bytes(damaged))
  for sub, name in (("gz", "notes.txt.gz"), ("zip", "pages.zip")):
    os.makedirs(tmp_path / sub)
    (tmp_path / sub / "good.txt").write_bytes(_code("textwrap.py"))
  (tmp_path / "gz" / "notes.txt.gz").write_bytes(gzip.compress(_code("heapq.py")))
  with zipfile.ZipFile(tmp_path / "zip" / "pages.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("pages.txt", _code("heapq.py"))
  bad = {"truncated": (str(tmp_path / "truncated.jsonl.gz"), "truncated"),
         "damaged": (str(tmp_path / "damaged.jsonl.gz"), "damaged"),
         "gz": (f"{tmp_path}/gz/*", "gzip file"), "zip": (f"{tmp_path}/zip/*", "zip file")}
  named = {"truncated": "truncated.jsonl.gz", "damaged": "damaged.jsonl.gz",
           "gz": "gz/notes.txt.gz", "zip": "zip/pages.zip"}
  cases = []
  for key, (source, what) in bad.items():
    c = tiny_config(steps=1)
    c.data.source = source
    cases.append(([*cli_args(c), f"--workdir={tmp_path}/w_{key}"],
                  (f"{tmp_path}/{named[key]}", what)))
  _assert_one_named_error(_drive("bipe_jax.train", cases, tmp_path), cases)
  for key in bad:
    assert not os.path.exists(tmp_path / f"w_{key}" / "checkpoints"), key


def test_jsonl_byte_order_mark_reads_like_without(tmp_path):
  lines = [json.dumps({"text": "first"}), json.dumps({"text": "second\nline"})]
  plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
  plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
  marked.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
  assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
  assert list(sources.read_documents(str(marked))) == ["first", "second\nline"]
  assert list(sources.read_documents(str(marked))) == list(sources.read_documents(str(plain)))


def test_eval_source_uses_the_runs_tokenizer_and_lengths_fail_before_restoring(tmp_path):
  """No checkpoint is saved here: each error must come before the restore."""
  c = tiny_config()
  work, bare = tmp_path / "work", tmp_path / "bare"
  pipeline.prepare(c, str(work))
  (work / "config.json").write_text(c.to_json())
  (work / "eval.json").write_text('{"saved": true}')
  os.makedirs(bare)
  (bare / "config.json").write_text(c.to_json())
  other = tmp_path / "other"
  os.makedirs(other)
  for name in ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py"):
    (other / f"{name}.txt").write_bytes(_code(name))
  w, source = f"--workdir={work}", f"--source={other}/*.txt"
  cases = [([w, source, "--lengths=100000"], ("--lengths", "100000")),
           ([w, "--lengths=32,100000"], ("--lengths", "100000", "--lengths=32,")),
           ([f"--workdir={bare}", source], (f"{bare}/data/tokenizer.model",))]
  _assert_one_named_error(_drive("bipe_jax.evaluate", cases, tmp_path), cases)

  # The other corpus was tokenized with the run's own tokenizer, not a new one.
  run_hash = Tokenizer.load(str(work / "data" / "tokenizer.model")).file_hash()
  (made,) = os.listdir(work / "data_eval")
  with open(work / "data_eval" / made / "meta.json") as f:
    assert json.load(f)["fingerprint"]["tokenizer_sha256"] == run_hash
  for d in (work, bare):
    trained = [os.path.join(r, f) for r, _, fs in os.walk(d / "data_eval")
               for f in fs if f.startswith("tokenizer")]
    assert not trained, trained
  assert (work / "eval.json").read_text() == '{"saved": true}'


def test_eval_on_another_corpus_keeps_the_previous_eval_json(tmp_path, capsys):
  from bipe_jax import evaluate
  none = {"kind": "none", "factor": 1.0}
  new = {"source": "other/*.txt", "rope_scaling": none, "results": []}
  # Same corpus and extension (an older file without "source" names the trained one):
  # a rerun replaces it, nothing is set aside.
  for old in ({"source": "other/*.txt", "rope_scaling": none},
              {"rope_scaling": none}):
    (tmp_path / "eval.json").write_text(json.dumps(old))
    evaluate._set_aside_other_eval(str(tmp_path), new, trained_source="other/*.txt")
    assert (tmp_path / "eval.json").is_file() and not list(tmp_path.glob("eval_before_*"))
  # Another corpus, or another context extension: the old result and plot are kept.
  for n, old in enumerate(({"source": "stdlib", "rope_scaling": none},
                           {"source": "other/*.txt", "rope_scaling": {"kind": "yarn"}})):
    (tmp_path / "eval.json").write_text(json.dumps(old))
    (tmp_path / "eval.png").write_bytes(b"png")
    for f in tmp_path.glob("eval_before_*"):
      f.unlink()
    evaluate._set_aside_other_eval(str(tmp_path), new, trained_source="stdlib")
    kept = sorted(p.name for p in tmp_path.glob("eval_before_*"))
    assert len(kept) == 2 and kept[0].endswith(".json") and kept[1].endswith(".png"), kept
    assert json.loads((tmp_path / kept[0]).read_text()) == old
    assert not (tmp_path / "eval.json").exists()
    assert "kept the previous eval.json" in capsys.readouterr().out
