"""Every pe.kind learns: its training loss falls on a learnable toy sequence.

Tiny shapes, and one compiled function per kind (init and all steps in one
`lax.scan`), so the 13 kinds stay cheap.
"""
import numpy as np
import pytest

from bipe_jax import encodings, trainer
from bipe_jax.data import pipeline
from bipe_jax.model import Decoder, ModelConfig
from tiny import tiny_config, train_losses

V, L, B, STEPS = 32, 16, 8, 60
SEP = 1


def _toy_batches() -> dict:
  """[STEPS, B, L] batches cut at random offsets from one periodic stream.

  The stream repeats a fixed order of the ids 2..V-1 with a separator after
  every fourth, so each next token follows from the one or two before it.
  """
  rng = np.random.default_rng(0)
  cycle = []
  for i, t in enumerate(rng.permutation(np.arange(2, V))):
    cycle += [t, SEP] if i % 4 == 3 else [t]
  stream = np.tile(cycle, 2 * L // len(cycle) + 2)
  table = np.zeros(V, bool)
  table[SEP] = True
  starts = rng.integers(0, len(cycle), (STEPS, B))
  steps = [pipeline.make_batch(np.stack([stream[s:s + L + 1] for s in row]), table, L)
           for row in starts]
  return {k: np.stack([b[k] for b in steps]) for k in steps[0]}


def _config(kind):
  c = tiny_config(steps=STEPS, kind=kind)
  c.data.seq_len, c.pe.max_intra = L, L
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.d_ff = 64
  c.train.batch_size, c.train.lr, c.train.warmup_steps = B, 1e-2, 5
  c.pe.max_random_position = 4 * L
  return c


def _losses(kind) -> np.ndarray:
  """Per-step training losses: the project's model, loss and optimizer (schedule,
  clipping, AdamW), init and every step in one jitted scan."""
  config = _config(kind)
  model = Decoder(ModelConfig.from_config(config, V))
  tx = trainer.make_optimizer(config.train)

  return train_losses(model, tx, _toy_batches(), STEPS)


@pytest.mark.parametrize("kind", sorted(encodings.KINDS))
def test_every_kind_learns_a_toy_sequence(kind):
  losses = _losses(kind)
  assert np.isfinite(losses).all(), losses
  # A V-way model starts near log(V) and must not start far off it.
  assert abs(losses[0] - np.log(V)) < 0.5, losses
  first, last = losses[:5].mean(), losses[-5:].mean()
  assert last < 0.5 * first, f"{kind}: loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
