"""Probe of the levels_stdlib sweep: two levels whose segments are blank-line blocks.

    python launch/sweep.py configs/sweeps/levels_probe_blocks.py
    bipe-compare runs/sweeps/levels_probe_blocks

BiPE-RoPE with pe.levels = 2 whose only separators are the six pieces of the
levels_stdlib tokenizer that hold a blank line ("\\n\\n", ")\\n\\n", ...):
segments average 141 tokens on the training data (blank-line blocks under
pe.levels = 3: 135), so the relative id counts blocks, as the outermost id of
pe.levels = 3 does, but no table says which line a token is in. Set against
levels_stdlib's runs it separates the two things pe.levels = 3 changes: a
coarser relative id, and a second learned table. Reuses levels_stdlib's data.
"""
import ml_collections

from configs.sweeps import levels_stdlib

# Pieces holding "\n\n" in runs/sweeps/levels_stdlib/data/tokenizer.model.
BLANK_LINE_PIECES = (291, 361, 425, 692, 757, 874)


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/quickstart.py"
  s.root = "runs/sweeps/levels_probe_blocks"
  s.overrides = levels_stdlib.overrides("runs/sweeps/levels_stdlib/data") + (
      ("pe.kind", "bipe_rope"), ("segmentation.separator_ids", BLANK_LINE_PIECES))
  s.product = (("seed", (0, 1)),)
  return s
