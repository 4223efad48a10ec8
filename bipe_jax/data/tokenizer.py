"""SentencePiece tokenizer that keeps line structure (BIPE_METHOD section 5).

SentencePiece trains on one sentence per input line, so a raw newline would never
reach it. We replace "\\n" by a visible stand-in character absent from the corpus
(both for training and encoding, mapped back when decoding), insert a
pretokenization delimiter after every run of newlines so that no piece spans into
the next line, and use identity normalisation, no dummy prefix and byte fallback so
that `decode(encode(s)) == s` exactly. A model of ours is recognised by the
stand-in being one of its pieces; any other model (e.g. Llama's) is used as is.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

# Stand-ins for "\n", in order of preference: the first one absent from the
# training sample is used. U+2424 is SYMBOL FOR NEWLINE; the others are
# private-use characters that real text essentially never contains.
NEWLINE_STANDINS = ("\u2424", "\ue00a", "\ue00b")
# Splits training sentences after each newline run; removed by the trainer.
_DELIMITER = "\ue000"
_SPACE = "\u2581"  # SentencePiece's whitespace symbol "▁".
MODALITIES = ("text", "code", "cot")
# SentencePiece's default max_sentence_length is 4192 bytes; stay below it.
_MAX_SENTENCE_BYTES = 4000
# A retrained tokenizer may differ, so a damaged one is never replaced silently.
_RETRAIN = ("delete {} to train the tokenizer and tokenize again (checkpoints made "
            "with the old tokenizer may not fit a new one)")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
  """A SentencePiece model plus the newline stand-in convention of ours.

  Attributes:
    vocab_size: number of pieces V.
    bos_id: id put before every document.
    pad_id: a valid id used for padding (0 if the model defines none).
    standin: the newline stand-in char, or None for a foreign model.
    model_path: file the model was loaded from / saved to ("" if in memory).
  """

  def __init__(self, sp: spm.SentencePieceProcessor, model_path: str = ""):
    self.sp = sp
    self.model_path = model_path
    self.vocab_size = int(sp.get_piece_size())
    self.standin = _detect_standin(sp)
    bos = sp.bos_id()
    if bos < 0:
      bos = sp.eos_id()
      if bos < 0:
        raise ValueError(f"tokenizer {model_path or '<in memory>'} defines neither a "
                         "BOS nor an EOS id; one is needed to mark document starts")
      logging.warning("tokenizer has no BOS id; using EOS id %d to start documents", bos)
    self.bos_id = int(bos)
    self.pad_id = int(sp.pad_id()) if sp.pad_id() >= 0 else 0
    self._piece_bytes = None  # Built lazily: only needed by our own decode.
    if self.standin is not None:
      self._standin_bytes = [sp.piece_to_id(f"<0x{b:02X}>")
                             for b in self.standin.encode("utf-8")]

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads a SentencePiece .model file (clear error if missing / invalid)."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer.model: no such file {path!r}")
    sp = spm.SentencePieceProcessor()
    try:
      sp.load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"tokenizer.model: {path!r} is not a valid SentencePiece "
                       f"model: {e}") from e
    return cls(sp, path)

  def file_hash(self) -> str:
    """sha256 of the serialized model, to fingerprint caches built with it."""
    return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

  # Encoding -------------------------------------------------------------------

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`, int32 [n] (no BOS)."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]:
    """Token ids of many texts (SentencePiece's multi-threaded list encode)."""
    texts = list(texts)
    if self.standin is None:
      ids = self.sp.encode(texts, num_threads=num_threads)
      return [np.asarray(x, dtype=np.int32) for x in ids]
    out = [None] * len(texts)
    plain = [i for i, t in enumerate(texts) if self.standin not in t]
    ids = self.sp.encode([texts[i].replace("\n", self.standin) for i in plain],
                         num_threads=num_threads)
    for i, x in zip(plain, ids):
      out[i] = np.asarray(x, dtype=np.int32)
    for i, t in enumerate(texts):
      if out[i] is None:
        out[i] = self._encode_with_literal_standin(t)
    return out

  def _encode_with_literal_standin(self, text: str) -> np.ndarray:
    # A literal stand-in char in the text must not decode to "\n": spell it with
    # its UTF-8 byte pieces, which our decode maps to bytes, not to a newline.
    parts = self.sp.encode([p.replace("\n", self.standin)
                            for p in text.split(self.standin)])
    ids = list(parts[0])
    for part in parts[1:]:
      ids.extend(self._standin_bytes)
      ids.extend(part)
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids) -> str:
    """Text of token ids; control pieces (BOS, EOS, pad) decode to nothing."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.standin is None:
      return self.sp.decode(ids)
    if self._piece_bytes is None:
      self._piece_bytes = self._build_piece_bytes()
    return b"".join(self._piece_bytes[i] for i in ids).decode("utf-8", errors="replace")

  def _build_piece_bytes(self) -> list[bytes]:
    out = []
    for i in range(self.vocab_size):
      if self.sp.is_control(i):
        out.append(b"")
      elif self.sp.is_unknown(i):
        out.append(" \u2047 ".encode())  # What SentencePiece itself prints.
      elif self.sp.is_byte(i):
        out.append(bytes([int(_BYTE_PIECE.match(self.sp.id_to_piece(i)).group(1), 16)]))
      else:
        out.append(self._piece_text(self.sp.id_to_piece(i)).encode("utf-8"))
    return out

  # Piece texts and separators ---------------------------------------------------

  def _piece_text(self, piece: str) -> str:
    text = piece.replace(_SPACE, " ")
    if self.standin is not None:
      text = text.replace(self.standin, "\n")
    return text

  def piece_texts(self) -> list[str]:
    """The real text of every piece, [V]: "▁" -> " ", stand-in / <0x0A> -> "\\n".

    Control and unknown pieces give "". A byte piece gives that byte decoded as
    UTF-8 (U+FFFD for a lone non-ASCII byte).
    """
    out = []
    for i in range(self.vocab_size):
      piece = self.sp.id_to_piece(i)
      if self.sp.is_control(i) or self.sp.is_unknown(i):
        out.append("")
      elif self.sp.is_byte(i) and _BYTE_PIECE.match(piece):
        b = int(_BYTE_PIECE.match(piece).group(1), 16)
        out.append(bytes([b]).decode("utf-8", errors="replace"))
      else:
        out.append(self._piece_text(piece))
    return out

  def separator_table(self, modality: str, cot_delimiter: str = ";",
                      explicit_ids: Iterable[int] = ()) -> np.ndarray:
    """Which pieces end a segment, bool [V].

    explicit_ids (if any) are exactly the separators. Otherwise by modality:
    code: pieces whose text contains "\\n"; text: those plus pieces whose text,
    without trailing whitespace, ends with ".", "!" or "?"; cot: pieces
    containing `cot_delimiter` or "\\n".
    """
    if modality not in MODALITIES:
      raise ValueError(f"segmentation.modality must be one of {MODALITIES}, "
                       f"got {modality!r}")
    table = np.zeros(self.vocab_size, dtype=np.bool_)
    explicit = [int(i) for i in explicit_ids]
    if explicit:
      bad = [i for i in explicit if not 0 <= i < self.vocab_size]
      if bad:
        raise ValueError(f"segmentation.separator_ids {bad} lie outside the "
                         f"vocabulary [0, {self.vocab_size})")
      table[explicit] = True
      return table
    if modality == "cot" and not cot_delimiter:
      raise ValueError("segmentation.cot_delimiter must be non-empty for modality 'cot'")
    for i, text in enumerate(self.piece_texts()):
      if "\n" in text:
        table[i] = True
      elif modality == "text":
        table[i] = text.rstrip().endswith((".", "!", "?"))
      elif modality == "cot":
        table[i] = cot_delimiter in text
    if not table.any():
      raise ValueError(
          f"no piece of this vocabulary ({self.vocab_size} pieces) ends a segment "
          f"for modality {modality!r}; set segmentation.separator_ids to the ids "
          "that should end a segment")
    return table


def _detect_standin(sp: spm.SentencePieceProcessor) -> str | None:
  for c in NEWLINE_STANDINS:
    i = sp.piece_to_id(c)
    if i != sp.unk_id() and not sp.is_byte(i) and not sp.is_control(i):
      return c
  return None


def _training_sentences(texts: Iterable[str], standin: str) -> Iterable[str]:
  """Training sentences: lines with the stand-in, each chunk under the max length."""
  run = re.compile(f"{re.escape(standin)}+")
  chunk, size = [], 0
  for text in texts:
    marked = run.sub(lambda m: m.group(0) + _DELIMITER, text.replace("\n", standin))
    for line in marked.split(_DELIMITER):
      if not line:
        continue
      n = len(line.encode("utf-8")) + 3
      if n > _MAX_SENTENCE_BYTES:
        # An over-long line: cut it (4 bytes per char at most keeps us under).
        step = _MAX_SENTENCE_BYTES // 4
        for k in range(0, len(line), step):
          yield line[k:k + step]
        continue
      if size + n > _MAX_SENTENCE_BYTES and chunk:
        yield _DELIMITER.join(chunk)
        chunk, size = [], 0
      chunk.append(line)
      size += n
    if chunk:  # Never join two documents into one sentence.
      yield _DELIMITER.join(chunk)
      chunk, size = [], 0


def check_no_inner_newline(tok: Tokenizer):
  """Raises if some piece has a newline anywhere but at its end."""
  bad = [(i, t) for i, t in enumerate(tok.piece_texts()) if "\n" in t.rstrip("\n")]
  if bad:
    raise ValueError(f"{len(bad)} tokenizer piece(s) span a line end, e.g. "
                     f"{bad[:5]}; segments would not align with lines")


def _rare_characters(texts: Sequence[str], vocab_size: int) -> str:
  """Characters to leave out of a tiny vocabulary (they fall back to bytes).

  Every character of the sample costs a piece on top of the 260 special and
  byte pieces, and SentencePiece will not cover less than 98% of characters; in
  a tiny vocabulary we keep only the most frequent characters so that about a
  quarter of the room is left for merges. Byte fallback still round-trips.
  """
  room = vocab_size - 4 - 256
  if room < 8:
    raise ValueError(f"tokenizer.vocab_size {vocab_size} is too small: 260 ids go to "
                     "special and byte pieces; use at least 268 (300+ is sensible)")
  counts = collections.Counter()
  for t in texts:
    counts.update(t)
  counts.pop("\n", None)  # Becomes the stand-in, which is always kept.
  keep = max(1, int(room * 0.75)) - 1
  if len(counts) <= keep:
    return ""
  return "".join(c for c, _ in counts.most_common()[keep:])


def train_tokenizer(texts: Sequence[str], model_prefix: str, vocab_size: int,
                    num_threads: int = 1) -> Tokenizer:
  """Trains a BPE SentencePiece model on `texts`; writes `<model_prefix>.model`.

  The vocabulary holds 4 special pieces (unk 0, BOS 1, EOS 2, pad 3), 256 byte
  pieces, the sample's characters (only the most frequent ones when the
  vocabulary is tiny) and BPE merges; `vocab_size` must be at least 268.
  """
  texts = list(texts)
  if not any(texts):
    raise ValueError("cannot train a tokenizer on an empty text sample")
  standin = next((c for c in NEWLINE_STANDINS if not any(c in t for t in texts)), None)
  if standin is None:
    raise ValueError(f"every newline stand-in {NEWLINE_STANDINS} occurs in the "
                     "training sample; cannot keep line structure")
  rare = _rare_characters(texts, vocab_size)
  if rare:
    # Turned into delimiters: never learnt, and no merge spans where they were.
    drop = str.maketrans({c: _DELIMITER for c in rare})
    texts = [t.translate(drop) for t in texts]
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_sentences(texts, standin)),
        model_writer=model, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        byte_fallback=True, character_coverage=1.0, required_chars=standin,
        pretokenization_delimiter=_DELIMITER,
        max_sentence_length=_MAX_SENTENCE_BYTES + 192,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        # The thread count is stored in the model file: a fixed one makes the
        # file (and the token-cache fingerprint) identical on every machine.
        num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed: "
                     f"{e}") from e
  path = model_prefix + ".model"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{uuid.uuid4().hex}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)  # Atomic: concurrent runs never see a half-written model.
  tok = Tokenizer.load(path)
  if tok.standin != standin:
    raise AssertionError(f"trained model lost its newline stand-in {standin!r}")
  check_no_inner_newline(tok)
  return tok


def _take_bytes(texts: Iterable[str], max_bytes: int) -> list[str]:
  out, total = [], 0
  for t in texts:
    if total >= max_bytes:
      break
    raw = t.encode("utf-8")
    if total + len(raw) > max_bytes:  # Cut the last one at a character boundary.
      raw = raw[:max_bytes - total]
      t = raw.decode("utf-8", errors="ignore")
    out.append(t)
    total += len(raw)
  return out


def run_tokenizer_path(config, workdir: str) -> str:
  """The tokenizer file a run in `workdir` with `config` uses (see load_or_train)."""
  cache_dir = config.data.cache_dir or os.path.join(workdir, "data")
  return os.path.abspath(config.tokenizer.model or os.path.join(cache_dir, "tokenizer.model"))


def load_or_train(config, cache_dir: str, sample_texts_fn) -> Tokenizer:
  """The run's tokenizer.

  `config.tokenizer.model` set: load it. Else reuse `<cache_dir>/tokenizer.model`
  when it was trained with the same vocab_size, sample_bytes and data source
  (recorded in tokenizer.json next to it), else train one on up to
  `config.tokenizer.sample_bytes` of `sample_texts_fn()` (an iterable of
  training documents, consumed lazily) and save it there.
  """
  tc = config.tokenizer
  if tc.model:
    return Tokenizer.load(tc.model)
  path = os.path.join(cache_dir, "tokenizer.model")
  recipe = {"vocab_size": int(tc.vocab_size), "sample_bytes": int(tc.sample_bytes),
            "source": config.data.source}
  recipe_path = os.path.join(cache_dir, "tokenizer.json")
  if os.path.isfile(path) and os.path.isfile(recipe_path):
    if _read_recipe(recipe_path) == recipe:
      logging.info("reusing tokenizer %s", path)
      try:
        return Tokenizer.load(path)
      except ValueError as e:
        raise ValueError(f"{e}; {_RETRAIN.format(cache_dir)}") from None
    logging.info("cached tokenizer %s was trained with other settings; retraining", path)
  texts = _take_bytes(sample_texts_fn(), int(tc.sample_bytes))
  if not any(texts):
    raise ValueError(f"data.source {config.data.source!r} produced no training text "
                     "to train the tokenizer on (no documents, or only empty ones)")
  print(f"training a {tc.vocab_size}-piece tokenizer on "
        f"{sum(len(t.encode('utf-8')) for t in texts) / 1e6:.1f} MB of text", flush=True)
  tok = train_tokenizer(texts, os.path.join(cache_dir, "tokenizer"), int(tc.vocab_size))
  tmp = f"{recipe_path}.tmp{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    json.dump(recipe, f)
  os.replace(tmp, recipe_path)
  return tok


def _read_recipe(path: str):
  """tokenizer.json's settings; a damaged file fails, naming it and the fix."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is damaged ({e}); {_RETRAIN.format(os.path.dirname(path))}"
                     ) from None
