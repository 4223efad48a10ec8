"""Sweep: levels_stdlib's six variants x two seeds on prose (pydoc topics).

    python launch/sweep.py configs/sweeps/levels_prose.py
    bipe-compare runs/sweeps/levels_prose

The corpus of configs/sweeps/prose.py (segmentation.modality = "text"): the
finest units end at sentence and line ends, and with pe.levels = 3 a blank line
ends a paragraph. Same model, training length (256), budget and lengths as
configs/sweeps/levels_stdlib.py.

Measured on this corpus with the sweep's 1024-piece tokenizer (145,445
training tokens): sentences or lines average 14.5 tokens (median 14) and
paragraphs 65.3 tokens (median 42, 90th percentile 145); a window of 256 tokens
ends 3.9 paragraphs on average and 95% of windows end at least one.
"""
import ml_collections

from configs.sweeps import levels_stdlib


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/quickstart.py"
  s.root = "runs/sweeps/levels_prose"
  s.overrides = levels_stdlib.overrides("runs/sweeps/levels_prose/data") + (
      ("data.source", "pydoc_topics"),
      ("data.heldout_fraction", 0.1),
      ("segmentation.modality", "text"),
  )
  s.product = ((("pe.kind", "pe.levels"), levels_stdlib.VARIANTS), ("seed", (0, 1)))
  return s
