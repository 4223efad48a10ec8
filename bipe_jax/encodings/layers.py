"""Linen pieces the decoder asks for: input term, positions, q/k transform, bias.

The model calls, in order:
  `InputEmbedding` once (absolute table or intra table, [B, L, D]),
  `attention_positions` once per forward (shared by all layers, so a
    randomized draw is the same in every layer),
  `RelativeEncoding` in each attention layer (rotates q/k, builds the bias).
Each delegates to the kind's parts (encodings.kind): no kind is named here.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bipe_jax.encodings import params as P
from bipe_jax.encodings.registry import Encoding


def attention_positions(enc: Encoding, params: P.Params, batch: dict,
                        train: bool, key=None):
  """[B, L] int32 positions feeding rotary/bias: `inter` or flat `positions`.

  Randomized kinds map them through a sorted random subset when `train` (key
  required); evaluation uses them as they are.
  """
  pos_BL = jnp.asarray(batch["inter"] if enc.bilevel else batch["positions"], jnp.int32)
  if enc.relative is None:
    return pos_BL
  if enc.randomized and train and key is None:
    raise ValueError(f"pe.kind={enc.name!r} draws random positions in training: "
                     "apply the model with rngs={'positions': key}")
  return enc.relative.positions(params, pos_BL, train, key)


class InputEmbedding(nn.Module):
  """Absolute term added to token embeddings: [B, L, D] float32, or None.

  learned: table [max_positions, D] over flat positions (ids clip to the last
    row). sinusoidal: sin/cos of flat positions, any length. intra: table over
    `intra` ids, learned (normal 0.02) or sinusoidal per pe.intra; with
    release_padding_row the last row is zero and gets no gradient.
  """
  enc: Encoding
  params: P.Params
  intra_params: P.Params | None
  d_model: int
  init_std: float = 0.02
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, batch):
    term = self.enc.input_term
    if term is None:
      return None
    return term.embed(self, batch, self.intra_params if self.enc.bilevel else self.params)


class RelativeEncoding(nn.Module):
  """One attention layer's relative part: (q, k, bias) from positions.

  q [B, L, H, D], k [B, L, K, D], pos [B, L] int. Returns q and k rotated (or
  unchanged) and the kind's bias object for the kernel (an
  attention.PositionBias) or None.

  span: 0 when the L tokens are the whole sequence; else the length of the
  sequence they are a piece of (cached decoding: the cache's slots), so that
  q and k are transformed alike whichever piece they arrive in.
  """
  enc: Encoding
  params: Any
  n_heads: int
  param_dtype: str = "float32"
  span: int = 0

  @nn.compact
  def __call__(self, q_BLHD, k_BLKD, pos_BL):
    rel = self.enc.relative
    if rel is None:
      return q_BLHD, k_BLKD, None
    if self.span:
      q_BLHD, k_BLKD = rel.rotate_span(self.params, q_BLHD, k_BLKD, pos_BL, self.span)
    else:
      q_BLHD, k_BLKD = rel.rotate(self.params, q_BLHD, k_BLKD, pos_BL)
    return q_BLHD, k_BLKD, rel.bias(self.params, pos_BL, self.n_heads, self.param_dtype)
