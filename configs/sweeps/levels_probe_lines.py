"""Probe of the levels_stdlib sweep: pe.levels = 3 whose middle level never moves.

    python launch/sweep.py configs/sweeps/levels_probe_lines.py
    bipe-compare runs/sweeps/levels_probe_lines

BiPE-RoPE with pe.levels = 3 where every line end (the 28 pieces of the
levels_stdlib tokenizer that end a line of code) is listed for both levels:
each line end ends a "block" too, so the line-in-block id is always 0 and the
relative id counts lines, as with pe.levels = 2. Its perplexity should match
levels_stdlib's two-level BiPE-RoPE; if it did not, the three-level path
itself (ids, pipeline, tables) would be at fault. Reuses levels_stdlib's data
and tokenizer (run that sweep, or at least its first run, first).
"""
import ml_collections

from configs.sweeps import levels_stdlib

# The line-ending pieces of runs/sweeps/levels_stdlib/data/tokenizer.model
# (Tokenizer.separator_table("code")).
LINE_ENDS = "14,273,275,291,295,361,369,387,399,425,452,515,523,592,598,609,628,678,692,702,757,771,781,827,834,874,914,937"


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/quickstart.py"
  s.root = "runs/sweeps/levels_probe_lines"
  s.overrides = levels_stdlib.overrides("runs/sweeps/levels_stdlib/data") + (
      ("pe.kind", "bipe_rope"), ("pe.levels", 3),
      ("segmentation.level_separator_ids", f"{LINE_ENDS};{LINE_ENDS}"))
  s.product = (("seed", (0, 1)),)
  return s
