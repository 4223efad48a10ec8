"""Arithmetic chain of thought modulo 7, BiPE-RoPE: train on 1..4 operators, test on 1..8.

One segment per reduction step (`segmentation.modality = "cot"`); each
expression is its own document (positions start at 0 at its BOS), so
expressions with more operators than in training are longer than any
training sequence. Sized for a 2-core CPU; other kinds by override
(`--config.pe.kind=fire`). Evaluate with `bipe-eval --workdir=DIR`.
"""
from bipe_jax.configs import base


def get_config():
  c = base.get_config()
  c.data.source = "arithmetic"
  c.data.packing = "documents"
  c.data.heldout_fraction = 0.02
  c.data.seq_len = 64               # a 4-operator document is at most ~46 characters
  c.segmentation.modality = "cot"
  c.tokenizer.vocab_size = 320
  c.tokenizer.sample_bytes = 500_000
  c.pe.kind = "bipe_rope"
  c.pe.max_intra = 64
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 4
  c.model.d_ff = 512
  c.train.batch_size = 32
  c.train.steps = 1000
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.schedule = "cosine"
  c.train.end_lr_factor = 0.1
  c.train.log_every = 50
  c.train.checkpoint_every = 200
  c.arithmetic.test_examples = 50
  c.eval.lengths = (64,)
  return c
