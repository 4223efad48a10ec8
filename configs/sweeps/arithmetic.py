"""Sweep: arithmetic chain of thought for four encodings (one seed).

    python launch/sweep.py configs/sweeps/arithmetic.py
    bipe-compare runs/sweeps/arithmetic

Trained on 1..4 operators, accuracy by greedy generation on 1..8
(configs/arithmetic_bipe_rope.py); the data set is shared (data.cache_dir).
"""
import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/arithmetic_bipe_rope.py"
  s.root = "runs/sweeps/arithmetic"
  s.overrides = (("data.cache_dir", "runs/sweeps/arithmetic/data"),)
  s.product = (("pe.kind", ("rope", "bipe_rope", "alibi", "bipe_alibi")),)
  return s
