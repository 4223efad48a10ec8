"""Padding, block sizes and custom-VJP plumbing shared by the blockwise kernels.

Ragged lengths are handled by padding to a multiple of the block: padded
queries and keys get document ids that match nothing (`PAD_Q_DOC` !=
`PAD_K_DOC`, both negative; real document ids are >= 0), so the document mask
removes them and the padded rows are sliced off the output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30   # finite: exp(NEG_INF - m) is 0 for any real row max m
PAD_Q_DOC = -1
PAD_K_DOC = -2


def pick_block(n: int, block: int, multiple: int = 8) -> int:
  """Block length for an axis of n tokens: `block`, or n rounded up to `multiple` when shorter."""
  if n >= block:
    return block
  return max(multiple, -(-n // multiple) * multiple)


def pad_to(x, axis: int, size: int, value=0):
  """Pads `axis` of x (array-like) at the end up to `size` with `value`; a jax array."""
  x = jnp.asarray(x)
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def q_offset_array(q_offset):
  """q_offset (Python int or traced scalar) as an int32 scalar array."""
  return jnp.asarray(q_offset, jnp.int32).reshape(())


def value_or_zeros(ct, like):
  """A cotangent that may be a symbolic zero, as an array shaped like `like`."""
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return ct
