"""Sweep: the stdlib sweep's five encodings x two seeds on prose (pydoc topics).

    python launch/sweep.py configs/sweeps/prose.py
    bipe-compare runs/sweeps/prose

The corpus is the reference-manual prose CPython ships as pydoc_data/topics.py
(data.source = "pydoc_topics", one document per help topic, about 0.46 MB);
segments end at sentence ends and line ends (segmentation.modality = "text").
Same model, budget and lengths as configs/sweeps/stdlib.py.
"""
import ml_collections

from configs.sweeps import stdlib


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/quickstart.py"
  s.root = "runs/sweeps/prose"
  s.overrides = stdlib.SMALL + (
      ("data.source", "pydoc_topics"),
      ("data.heldout_fraction", 0.1),
      ("segmentation.modality", "text"),
      ("data.cache_dir", "runs/sweeps/prose/data"),
  )
  s.product = (("pe.kind", stdlib.KINDS), ("seed", (0, 1)))
  return s
