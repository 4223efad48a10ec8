"""Linen pieces the decoder asks for: input term, positions, q/k transform, bias.

The model calls, in order:
  `InputEmbedding` once (absolute table or intra table, [B, L, D]),
  `attention_positions` once per forward (shared by all layers, so a
    randomized draw is the same in every layer),
  `RelativeEncoding` in each attention layer (rotates q/k, builds the bias).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bipe_jax.encodings import alibi, fire, randomized, tables, xpos
from bipe_jax.encodings import params as P
from bipe_jax.encodings.registry import Encoding
from bipe_jax.encodings.rope import apply_rope


def attention_positions(enc: Encoding, params: P.Params, batch: dict,
                        train: bool, key=None):
  """[B, L] int32 positions feeding rotary/bias: `inter` or flat `positions`.

  Randomized kinds map them through a sorted random subset when `train` (key
  required); evaluation uses them as they are.
  """
  pos_BL = batch["inter"] if enc.bilevel else batch["positions"]
  pos_BL = jnp.asarray(pos_BL, jnp.int32)
  if enc.randomized and train:
    if key is None:
      raise ValueError(f"pe.kind={enc.name!r} draws random positions in training: "
                       "apply the model with rngs={'positions': key}")
    pos_BL = randomized.randomize_positions(key, pos_BL, params.max_random_position)
  return pos_BL


class InputEmbedding(nn.Module):
  """Absolute term added to token embeddings: [B, L, D] float32, or None.

  learned: table [max_positions, D] over flat positions (ids clip to the last
    row). sinusoidal: sin/cos of flat positions, any length. intra: table over
    `intra` ids, learned (normal 0.02) or sinusoidal per pe.intra; with
    release_padding_row the last row is zero and gets no gradient.
  """
  enc: Encoding
  params: P.Params
  intra_params: P.IntraParams | None
  d_model: int
  init_std: float = 0.02
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, batch):
    term = self.enc.input_term
    if term is None:
      return None
    if term == "intra":
      ip = self.intra_params
      ids_BL = batch["intra"]
      if ip.intra == "sinusoidal":
        return tables.sinusoidal(ids_BL, self.d_model)
      return self._lookup(ids_BL, ip.max_intra, ip.release_padding_row)
    if term == "sinusoidal":
      return tables.sinusoidal(batch["positions"], self.d_model)
    return self._lookup(batch["positions"], self.params.max_positions, False)

  def _lookup(self, ids_BL, size: int, padding_row: bool):
    init = nn.initializers.normal(self.init_std)
    if padding_row:
      base_init = init
      init = lambda key, shape, dtype: base_init(key, shape, dtype).at[-1].set(0)
    table = self.param("table", nn.with_logical_partitioning(init, ("positions", "embed")),
                       (size, self.d_model), self.param_dtype)
    ids_BL = jnp.clip(ids_BL, 0, size - 1)
    out_BLD = jnp.take(table, ids_BL, axis=0).astype(jnp.float32)
    if padding_row:
      # The release's nn.Embedding(padding_idx=-1): that row reads as zero.
      out_BLD = jnp.where((ids_BL == size - 1)[..., None], 0.0, out_BLD)
    return out_BLD


class RelativeEncoding(nn.Module):
  """One attention layer's relative part: (q, k, bias) from positions.

  q [B, L, H, D], k [B, L, K, D], pos [B, L] int. Returns q and k rotated (or
  unchanged) and a bias object for the kernel (alibi: attention.Bias, fire:
  FireBias) or None.
  """
  enc: Encoding
  params: Any
  n_heads: int
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, q_BLHD, k_BLKD, pos_BL):
    enc, p = self.enc, self.params
    if enc.rotary == "rope":
      q_BLHD = apply_rope(q_BLHD, pos_BL, p.rope_base)
      k_BLKD = apply_rope(k_BLKD, pos_BL, p.rope_base)
    elif enc.rotary == "xpos":
      center = q_BLHD.shape[1] // 2
      kw = dict(base=p.rope_base, scale_base=p.xpos_scale_base, center=center)
      q_BLHD = xpos.apply_xpos(q_BLHD, pos_BL, key=False, **kw)
      k_BLKD = xpos.apply_xpos(k_BLKD, pos_BL, key=True, **kw)
    bias = None
    if enc.bias == "alibi":
      bias = alibi.alibi_bias(alibi.alibi_slopes(self.n_heads, p.alibi_multiplier), pos_BL)
    elif enc.bias == "fire":
      bias = fire.Fire(self.n_heads, p.fire_hidden, p.fire_init_c,
                       p.fire_init_threshold, self.param_dtype, name="fire")(pos_BL)
    return q_BLHD, k_BLKD, bias
