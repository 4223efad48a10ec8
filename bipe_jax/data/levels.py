"""Separators of more than two levels (pe.levels), from a tokenizer's pieces.

`separators` gives the positions.LevelSeparators of a run: by modality with
the blank-line rule, or the explicit ids of segmentation.level_separator_ids;
`report` prints each level's mean unit length on the training tokens and
fails naming a level that never ends there.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bipe_jax import positions
from bipe_jax.data.tokenizer import Tokenizer


def separators(tok: Tokenizer, levels: int, modality: str, cot_delimiter: str = ";",
               separator_ids: Iterable[int] = (), level_separator_ids: str = ""
               ) -> positions.LevelSeparators:
  """Which pieces of `tok` end a unit of which of `levels` levels.

  level_separator_ids (if any, see `parse_ids`): one id list per level above
  tokens, finest first; an id listed for level c ends a unit of level c and
  of every finer one, and the classes are those lists alone. Otherwise the
  finest level is `tok.separator_table` (lines for code, sentences and lines
  for text, steps for cot) and, with three levels or more, a blank line ends
  a unit of level 2 (a block of code, a paragraph), two blank lines in a row
  one of level 3, and so on (positions.LevelSeparators.from_texts).
  """
  lists = parse_ids(levels, separator_ids, level_separator_ids)
  if not lists:
    finest = tok.separator_table(modality, cot_delimiter, separator_ids)
    seps = positions.LevelSeparators.from_texts(levels, tok.piece_texts(), finest)
    if levels > 2 and not seps.newlines.any():
      raise ValueError(f"pe.levels={levels}: no piece of this vocabulary holds a "
                       "newline, so no blank line can end a unit of level 2; set "
                       "segmentation.level_separator_ids or use pe.levels=2")
    return seps
  piece_class = np.zeros(tok.vocab_size, np.int8)
  for level, ids in enumerate(lists, 1):
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
      raise ValueError(f"segmentation.level_separator_ids[{level - 1}] holds {bad}, "
                       f"outside the vocabulary [0, {tok.vocab_size})")
    piece_class[list(ids)] = np.maximum(piece_class[list(ids)], level)
  return positions.LevelSeparators(levels, piece_class)


def parse_ids(levels: int, separator_ids, level_separator_ids: str) -> tuple[tuple[int, ...], ...]:
  """segmentation.level_separator_ids ("869;13": one comma-separated id list
  per level above tokens, finest first, ";" between levels) as tuples; ()
  when empty. Raises ValueError unless it fits pe.levels."""
  text = str(level_separator_ids).strip()
  if not text:
    return ()
  example = "e.g. '869;13' for sentences (id 869) in lines (id 13) in documents"
  try:
    lists = tuple(tuple(int(i) for i in part.split(",") if i.strip())
                  for part in text.split(";"))
  except ValueError:
    raise ValueError(f"segmentation.level_separator_ids={text!r} must be comma-separated "
                     f"token ids, one list per level, finest first, ';' between; "
                     f"{example}") from None
  if len(lists) != levels - 1 or not all(lists):
    raise ValueError(f"segmentation.level_separator_ids={text!r} must hold pe.levels - 1 = "
                     f"{levels - 1} non-empty id lists, one per level above tokens, finest "
                     f"first; {example}")
  if tuple(separator_ids):
    raise ValueError("set segmentation.separator_ids or segmentation.level_separator_ids, "
                     "not both")
  return lists


def _unit_name(seg, level: int) -> str:
  """What ends a unit of `level` (>= 1) under config.segmentation `seg`."""
  if seg.level_separator_ids:
    return "its ids in segmentation.level_separator_ids"
  if level == 1:
    return {"code": "a line end", "text": "a sentence or line end",
            "cot": "a step delimiter or line end"}[seg.modality]
  return f"{level - 1} blank line{'s' if level > 2 else ''} in a row"


def report(seps: positions.LevelSeparators, tokens, seg,
           limit: int = 1 << 24, chunk: int = 1 << 20) -> None:
  """Prints the mean length of each level's units over the first `limit`
  training tokens (under config.segmentation `seg`); fails naming a level
  whose units never end there."""
  n = min(len(tokens), limit)
  ends = np.zeros(seps.levels, np.int64)
  for i in range(0, n, chunk):
    classes = seps.classes(np.asarray(tokens[i:min(n, i + chunk)]))
    ends += np.bincount(classes, minlength=seps.levels)
  ends = np.cumsum(ends[::-1])[::-1]  # ends[c]: tokens of class >= c
  for c in range(1, seps.levels):
    if not ends[c]:
      raise ValueError(
          f"pe.levels={seps.levels}: no separator of level {c} ({_unit_name(seg, c)}) "
          f"occurs in the first {n:,} training tokens; use fewer levels or set "
          "segmentation.level_separator_ids")
  print(f"{seps.levels} levels over {n:,} training tokens, mean tokens per unit: " +
        ", ".join(f"level {c} {n / ends[c]:.1f} (ends at {_unit_name(seg, c)})"
                  for c in range(1, seps.levels)), flush=True)
