"""The paper's BiPE-ALiBi 151M model: the BiPE-RoPE setup with pe.kind="bipe_alibi"."""
import os

from bipe_jax.config import load_file


def get_config():
  # Loaded by path: this folder is not an installed package.
  c = load_file(os.path.join(os.path.dirname(__file__), "bipe_rope_151m.py"))
  c.pe.kind = "bipe_alibi"
  return c
