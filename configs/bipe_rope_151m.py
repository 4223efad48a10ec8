"""The paper's BiPE-RoPE language model (BIPE_METHOD section 3), Llama vocab size."""
from bipe_jax.configs import base


def get_config():
  c = base.get_config()
  c.pe.kind = "bipe_rope"
  c.segmentation.modality = "text"
  c.tokenizer.vocab_size = 32000
  return c
