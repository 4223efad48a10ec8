"""Randomized positions (Ruoss et al. 2023), for any relative encoding.

While training, each sequence draws a sorted random subset of size L from
[0, max_random_position); the token at position p (flat index in its
document, or its segment index for bilevel kinds) takes the p-th smallest
element. Order is kept, distances are stretched at random, so the model sees
large positions during training. At evaluation positions are plain.
"""
import jax
import jax.numpy as jnp


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
