"""Arithmetic chain of thought with RoPE: configs/arithmetic_bipe_rope.py with pe.kind="rope"."""
from configs import arithmetic_bipe_rope


def get_config():
  c = arithmetic_bipe_rope.get_config()
  c.pe.kind = "rope"
  return c
