"""Small BiPE-RoPE model on the standard-library code corpus, for a 2-core CPU."""
from bipe_jax.configs import base


def get_config():
  c = base.get_config()
  c.data.seq_len = 128
  c.pe.max_intra = 128
  c.model.d_model = 256
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 4
  c.model.d_ff = 1024
  c.train.batch_size = 16
  c.train.steps = 300
  c.train.lr = 2e-3
  c.train.warmup_steps = 30
  c.train.schedule = "cosine"
  c.train.end_lr_factor = 0.1
  c.train.log_every = 50
  c.train.checkpoint_every = 100
  c.eval.lengths = (128, 256, 512, 1024)
  c.eval.max_tokens = 32_768
  c.eval.batch_tokens = 8192
  return c
