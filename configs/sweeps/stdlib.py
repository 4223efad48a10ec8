"""Sweep: five encodings x two seeds on standard-library code, trained at 64 tokens.

    python launch/sweep.py configs/sweeps/stdlib.py
    bipe-compare runs/sweeps/stdlib

Perplexity at 1x, 2x, 4x, 8x and 16x the training length. Every run shares
one tokenizer and tokenized corpus (data.cache_dir) and, for a seed, the same
initial data order. Sized for a 2-core CPU (see RESULTS.md for the wall time).
"""
import ml_collections

KINDS = ("rope", "bipe_rope", "alibi", "bipe_alibi", "none")
SMALL = (
    ("data.seq_len", 64),
    ("pe.max_intra", 64),
    ("tokenizer.vocab_size", 1024),
    ("tokenizer.sample_bytes", 2_000_000),
    ("model.d_model", 128),
    ("model.n_layers", 4),
    ("model.n_heads", 4),
    ("model.n_kv_heads", 4),
    ("model.d_ff", 512),
    ("train.batch_size", 16),
    ("train.steps", 400),
    ("train.lr", 2e-3),
    ("train.warmup_steps", 40),
    ("train.checkpoint_every", 100),
    ("eval.lengths", (64, 128, 256, 512, 1024)),
    ("eval.max_tokens", 16_384),
    ("eval.batch_tokens", 4096),
)


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/quickstart.py"
  s.root = "runs/sweeps/stdlib"
  s.overrides = SMALL + (("data.cache_dir", "runs/sweeps/stdlib/data"),)
  s.product = (("pe.kind", KINDS), ("seed", (0, 1)))
  return s
