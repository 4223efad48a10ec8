"""Randomized positions (Ruoss et al. 2023), for any relative encoding.

While training, each sequence draws a sorted random subset of size L from
[0, max_random_position); the token at position p (flat index in its
document, or its segment index for bilevel kinds) takes the p-th smallest
element. Order is kept, distances are stretched at random, so the model sees
large positions during training. At evaluation positions are plain.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bipe_jax.encodings import params as P
from bipe_jax.encodings.rope import RopeParams, RopeRelative


def sorted_subset(key, batch: int, length: int, max_random_position: int):
  """[B, L] int32: per row, L distinct sorted ints from [0, max_random_position)."""
  if length > max_random_position:
    raise ValueError(f"pe.max_random_position={max_random_position} must be >= "
                     f"the sequence length {length}")
  draw = lambda k: jnp.sort(jax.random.choice(k, max_random_position, (length,),
                                              replace=False))
  return jax.vmap(draw)(jax.random.split(key, batch)).astype(jnp.int32)


def randomize_positions(key, pos_BL, max_random_position: int):
  """Maps positions in [0, L) through one sorted random subset per row."""
  b, length = pos_BL.shape
  subset_BL = sorted_subset(key, b, length, max_random_position)
  idx_BL = jnp.clip(pos_BL, 0, length - 1)
  return jnp.take_along_axis(subset_BL, idx_BL, axis=1)


@dataclasses.dataclass(frozen=True)
class RandomizedRopeParams(RopeParams):
  """RoPE on a sorted random subset of [0, max_random_position) while training;
  must be >= data.seq_len."""
  max_random_position: int = 8192

  def __post_init__(self):
    super().__post_init__()
    P.positive("max_random_position", self.max_random_position)


@dataclasses.dataclass(frozen=True)
class RandomizedRopeRelative(RopeRelative):
  """RoPE on randomized positions while training, plain ones at evaluation."""
  params_cls = RandomizedRopeParams
  randomized = True

  def positions(self, p, pos_BL, train: bool, key):
    return randomize_positions(key, pos_BL, p.max_random_position) if train else pos_BL

  def check(self, p, cfg) -> None:
    if p.max_random_position < cfg.max_positions:
      raise ValueError(f"pe.max_random_position={p.max_random_position} must be "
                       f">= data.seq_len={cfg.max_positions}")
