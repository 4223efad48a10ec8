"""Arithmetic chain of thought with ALiBi: configs/arithmetic_bipe_rope.py with pe.kind="alibi"."""
from configs import arithmetic_bipe_rope


def get_config():
  c = arithmetic_bipe_rope.get_config()
  c.pe.kind = "alibi"
  return c
