"""Arithmetic chain of thought with BiPE-ALiBi: configs/arithmetic_bipe_rope.py with pe.kind="bipe_alibi"."""
from configs import arithmetic_bipe_rope


def get_config():
  c = arithmetic_bipe_rope.get_config()
  c.pe.kind = "bipe_alibi"
  return c
