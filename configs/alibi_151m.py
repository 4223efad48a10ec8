"""The paper's ALiBi 151M model: the BiPE-RoPE setup with pe.kind="alibi"."""
from configs import bipe_rope_151m


def get_config():
  c = bipe_rope_151m.get_config()
  c.pe.kind = "alibi"
  return c
