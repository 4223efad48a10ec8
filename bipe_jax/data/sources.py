"""Text sources: which files, how to read their documents, how to split them.

A *document* is one training unit that the pipeline prefixes with BOS: a whole
.txt / code file, one line of a .jsonl(.gz) file, or one ArrayRecord record.
The train / held-out split is decided by a stable hash of a file's path relative
to the source root (or of a document's index, for a single file), so adding a
file never moves any other file across the split.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

from absl import logging
import numpy as np

# Path components whose files are not part of the "stdlib" corpus: the test
# suites are huge, repetitive and full of deliberately odd code.
_STDLIB_EXCLUDED = frozenset({"test", "tests", "idle_test", "site-packages"})
FORMATS = ("auto", "text", "jsonl", "arrayrecord")
_REPLACEMENT = "\ufffd"
_BOM = b"\xef\xbb\xbf"
# Leading bytes of compressed / archive formats that a text file never starts with.
_PACKED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                 (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"),
                 (b"7z\xbc\xaf\x27\x1c", "7z"), (b"PAR1", "parquet"))


def stdlib_files() -> list[str]:
  """Sorted `*.py` files of this Python's standard library, test dirs excluded."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place so os.walk never descends into excluded directories.
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED]
    out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  return sorted(out)


def source_root(source: str, paths: Sequence[str]) -> str:
  """Directory that split hashes are relative to (stdlib dir or common parent)."""
  if source == "stdlib":
    return sysconfig.get_paths()["stdlib"]
  if not paths:
    return ""
  if len(paths) == 1:
    return os.path.dirname(os.path.abspath(paths[0]))
  return os.path.commonpath([os.path.abspath(p) for p in paths])


def list_files(source: str, config=None, cache_dir: str = "") -> list[str]:
  """Files of a source: "stdlib", a GENERATED name, or comma-separated files / globs (`**` ok).

  Returns a sorted, de-duplicated list. A pattern that matches nothing raises
  ValueError naming it. GENERATED sources write their file into `cache_dir`
  (from `config`) and return it.
  """
  if not source or not source.strip():
    raise ValueError('data.source is empty; pass "stdlib" or a comma-separated '
                     "list of files / globs (e.g. 'corpus/**/*.jsonl')")
  if source.strip() == "stdlib":
    return stdlib_files()
  if source.strip() in GENERATED:
    if not cache_dir:
      raise ValueError(f"data.source {source.strip()!r} is generated and needs a cache directory")
    os.makedirs(cache_dir, exist_ok=True)
    if source.strip() == "pydoc_topics":
      return [write_pydoc_topics(cache_dir)]
    from bipe_jax.tasks import arithmetic  # pylint: disable=g-import-not-at-top
    return [arithmetic.write_train_file(config, cache_dir)]
  out = set()
  for pattern in (p.strip() for p in source.split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    found = glob.glob(pattern, recursive=True)
    matches = [m for m in found if os.path.isfile(m)]
    _warn_skipped(pattern, [m for m in found if not os.path.isfile(m)])
    if not matches:
      raise ValueError(
          f"data.source pattern {pattern!r} matches no file; pass \"stdlib\" or a "
          "comma-separated list of existing files / globs of .txt, code, "
          ".jsonl(.gz) or .array_record files (recursive '**' allowed)")
    out.update(matches)
  if not out:
    raise ValueError(f"data.source {source!r} names no file; pass \"stdlib\" or a "
                     "comma-separated list of files / globs")
  return sorted(out)


def _warn_skipped(pattern: str, skipped: list[str]) -> None:
  """Names what a pattern matched that is not a readable file (directories, broken links)."""
  dirs = sorted(m for m in skipped if os.path.isdir(m))
  broken = sorted(m for m in skipped if os.path.islink(m) and not os.path.exists(m))
  for what, names, hint in (
      (("directory", "directories"), dirs, "a '**/' pattern reads the files below"),
      (("dangling symlink", "dangling symlinks"), broken, "no target file")):
    if names:
      shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
      logging.warning("data.source pattern %r matches %d %s, skipped (%s): %s", pattern,
                      len(names), what[len(names) > 1], hint, shown)


# Sources made on the fly into the data cache: "pydoc_topics" (the prose of
# this Python's pydoc topic help, one document per topic) and "arithmetic"
# (bipe_jax/tasks/arithmetic.py, from config.arithmetic).
GENERATED = ("pydoc_topics", "arithmetic")


def write_if_changed(path: str, text: str) -> str:
  """Writes `text` to `path` atomically unless it already holds exactly that.

  An unchanged file keeps its mtime, so the tokenized-corpus cache stays valid.
  """
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return path
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_pydoc_topics(cache_dir: str) -> str:
  """<cache_dir>/pydoc_topics.jsonl: {"topic", "text"} per pydoc help topic, sorted by topic.

  The text is the reference manual's prose (about 0.46 MB in Python 3.11),
  shipped with CPython as pydoc_data/topics.py.
  """
  try:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("data.source 'pydoc_topics' needs the standard library's pydoc_data "
                     "package, which this Python lacks (Debian: apt install "
                     "libpython3-stdlib); choose another data.source") from None
  lines = [json.dumps({"topic": k, "text": topics[k]}) for k in sorted(topics)]
  return write_if_changed(os.path.join(cache_dir, "pydoc_topics.jsonl"), "\n".join(lines) + "\n")


def detect_format(path: str, fmt: str = "auto") -> str:
  """Resolved reader for `path`: "text", "jsonl" or "arrayrecord"."""
  if fmt not in FORMATS:
    raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
  if fmt != "auto":
    return fmt
  name = path.lower()
  if name.endswith((".jsonl", ".jsonl.gz")):
    return "jsonl"
  if name.endswith((".array_record", ".arrayrecord")):
    return "arrayrecord"
  return "text"


class _Replacements:
  """Counts documents whose bytes were not valid UTF-8 (decoded with errors="replace")."""

  def __init__(self, path: str):
    self.path, self.docs, self.chars = path, 0, 0

  def decode(self, raw: bytes) -> str:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      text = raw.decode("utf-8", errors="replace")
      self.docs += 1
      self.chars += text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
      return text

  def report(self):
    if self.docs:
      logging.warning("%s: %d document(s) had invalid UTF-8; %d byte sequence(s) "
                      "replaced by U+FFFD", self.path, self.docs, self.chars)


def _json_text(record, text_field: str, where: str) -> str:
  if not isinstance(record, dict) or text_field not in record:
    raise ValueError(f"{where}: expected a JSON object with field {text_field!r} "
                     "(set data.text_field to the field holding the text)")
  text = record[text_field]
  if not isinstance(text, str):
    raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, "
                     "not a string")
  return text


def _read_jsonl(path: str, text_field: str, rep: _Replacements) -> Iterator[str]:
  opener = gzip.open if path.lower().endswith(".gz") else open
  with opener(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if lineno == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]  # A UTF-8 byte-order mark some editors write.
      if not raw.strip():
        continue  # Blank lines (often a trailing one) carry no document.
      line = rep.decode(raw)
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
      yield _json_text(record, text_field, f"{path}:{lineno}")


def _read_array_record(path: str, text_field: str,
                       rep: _Replacements) -> Iterator[str]:
  from array_record.python import array_record_module  # Heavy; import lazily.
  reader = array_record_module.ArrayRecordReader(path)
  try:
    n = reader.num_records()
    step = 1024  # Bounded memory for large files.
    for start in range(0, n, step):
      for i, raw in enumerate(reader.read(start, min(n, start + step)), start):
        text = rep.decode(raw)
        record = None
        if text[:1] == "{":
          try:
            record = json.loads(text)
          except json.JSONDecodeError:
            record = None  # Raw text that merely starts with "{".
        if isinstance(record, dict):
          yield _json_text(record, text_field, f"{path}: record {i}")
        else:
          yield text
  finally:
    reader.close()


def _check_not_packed(path: str, raw: bytes) -> None:
  """Refuses a compressed or archive file that would be read as plain text."""
  for magic, kind in _PACKED_MAGIC:
    if raw.startswith(magic) and (kind != "bzip2" or raw[4:10] == b"1AY&SY") and (
        kind != "parquet" or raw.endswith(magic)):
      raise ValueError(
          f"{path}: a {kind} file, which would be read as plain text (its bytes, "
          "not its contents); decompress it, or for JSON lines name it .jsonl.gz or "
          "set data.format=jsonl (data.source reads plain text, .jsonl, .jsonl.gz "
          "and .array_record files)")


def read_documents(path: str, fmt: str = "auto",
                   text_field: str = "text") -> Iterator[str]:
  """Yields the documents of one file as str.

  text / code files are one document; .jsonl(.gz) has one JSON object per line
  with the text in `text_field`; .array_record holds one document per record
  (a JSON object with `text_field`, or raw UTF-8 text). Invalid UTF-8 is
  replaced (errors="replace") and counted in a logged warning.
  """
  kind = detect_format(path, fmt)
  rep = _Replacements(path)
  try:
    if kind == "text":
      with open(path, "rb") as f:
        raw = f.read()
      _check_not_packed(path, raw)
      yield rep.decode(raw)
    elif kind == "jsonl":
      yield from _read_jsonl(path, text_field, rep)
    else:
      yield from _read_array_record(path, text_field, rep)
  except OSError as e:
    raise OSError(f"cannot read data file {path!r}: {e}") from e
  except (EOFError, zlib.error) as e:  # gzip: truncated or damaged stream.
    raise OSError(f"cannot read data file {path!r}: damaged or truncated gzip data "
                  f"({e}); replace the file with a complete copy") from e
  except RuntimeError as e:  # array_record reports unreadable files this way.
    raise OSError(f"cannot read data file {path!r} as ArrayRecord: {e}") from e
  finally:
    rep.report()


def stable_fraction(key: str) -> float:
  """A number in [0, 1) fixed by `key` alone (sha1), for reproducible splits."""
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_keys(keys: Sequence[str], heldout_fraction: float) -> np.ndarray:
  """Held-out mask over keys; at least one held out (and one kept) when >= 2."""
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction}")
  fractions = np.array([stable_fraction(k) for k in keys], dtype=np.float64)
  heldout = fractions < heldout_fraction
  if heldout_fraction > 0 and len(keys) >= 2:
    if not heldout.any():
      heldout[np.argmin(fractions)] = True
    if heldout.all():
      heldout[np.argmax(fractions)] = False
  return heldout


def split_files(paths: Sequence[str], heldout_fraction: float,
                root: str | None = None) -> tuple[list[str], list[str]]:
  """File-level train / held-out split by a hash of each path relative to `root`.

  `root` defaults to the paths' common parent. With >= 2 files and a positive
  fraction, at least one file is held out and at least one is kept.
  """
  paths = list(paths)
  if root is None:
    root = source_root("", paths)
  keys = [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/")
          for p in paths]
  heldout = _split_keys(keys, heldout_fraction)
  return ([p for p, h in zip(paths, heldout) if not h],
          [p for p, h in zip(paths, heldout) if h])


def split_documents(num_documents: int, heldout_fraction: float,
                    key: str = "") -> np.ndarray:
  """Document-level split for a single file: bool [num_documents], True = held out.

  Decided by a hash of `key` and the document index, so appending documents
  never moves earlier ones.
  """
  return _split_keys([f"{key}#{i}" for i in range(num_documents)], heldout_fraction)


def is_heldout_document(index: int, heldout_fraction: float, key: str = "") -> bool:
  """Streaming form of `split_documents` (without the at-least-one guarantee)."""
  return stable_fraction(f"{key}#{index}") < heldout_fraction
