"""Sweep: a third position level against BiPE and the flat kinds, on standard-library code.

    python launch/sweep.py configs/sweeps/levels_stdlib.py
    bipe-compare runs/sweeps/levels_stdlib

Six variants x two seeds: RoPE, BiPE-RoPE (pe.levels = 2: token in line, line
in file), BiPE-RoPE with pe.levels = 3 (token in line, line in blank-line
block, block in file), and the same three for ALiBi. The model is the stdlib
sweep's (configs/sweeps/stdlib.py SMALL), trained at 256 tokens so that
blank-line blocks end inside a window.

Measured on this corpus with the sweep's 1024-piece tokenizer (4,720,055
training tokens): lines average 17.2 tokens (median 16, 99th percentile 42)
and blank-line blocks 119.1 tokens (median 59, 90th percentile 206); a window
of 256 tokens ends 2.15 blocks on average and 70% of windows end at least one
(at 64 tokens: 0.54 and 40%). The budget is the stdlib sweep's, 400 steps x 16
rows x 64 tokens = 409,600 tokens per run: here 200 steps x 8 rows x 256.
Perplexity at 1x, 2x, 4x, 8x and 16x the training length.
"""
import ml_collections

from configs.sweeps import stdlib

# (pe.kind, pe.levels): the flat kind, BiPE, and BiPE with a third level.
VARIANTS = (("rope", 2), ("bipe_rope", 2), ("bipe_rope", 3),
            ("alibi", 2), ("bipe_alibi", 2), ("bipe_alibi", 3))
LONGER = (
    ("data.seq_len", 256),
    ("train.batch_size", 8),
    ("train.steps", 200),
    ("train.warmup_steps", 20),
    ("train.checkpoint_every", 50),
    ("eval.lengths", (256, 512, 1024, 2048, 4096)),
)


def overrides(cache_dir: str) -> tuple:
  """stdlib.SMALL with the longer training length of this sweep."""
  changed = dict(LONGER)
  return tuple((k, changed.get(k, v)) for k, v in stdlib.SMALL) + (
      ("data.cache_dir", cache_dir),)


def get_config():
  s = ml_collections.ConfigDict()
  s.base = "configs/quickstart.py"
  s.root = "runs/sweeps/levels_stdlib"
  s.overrides = overrides("runs/sweeps/levels_stdlib/data")
  s.product = ((("pe.kind", "pe.levels"), VARIANTS), ("seed", (0, 1)))
  return s
