"""Rotary position embedding in the rotate-half (Llama) layout (Su et al. 2021).

Frequency i (of D/2) rotates the pair of dims (i, i + D/2), the layout of HF
Llama weights, so imported q/k projections need no permutation.
`pe.rope_scaling` (encodings.rope_scaling) stretches the frequencies of every
rotary kind for inputs longer than the training length.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bipe_jax.encodings import params as P
from bipe_jax.encodings import rope_scaling as S
from bipe_jax.encodings.kind import Relative


def rope_angles(pos_BL, head_dim: int, base: float, scaling: S.RopeScaling = S.RopeScaling(),
                train_length: int = 0):
  """Angles [B, L, D/2] float32: pos * base^(-2i/D), or the frequencies `scaling` gives."""
  return pos_BL.astype(jnp.float32)[..., None] * S.inv_frequencies(
      head_dim, base, scaling, train_length)


def rotate(x_BLHD, angle_BLF, scale_BLF=None):
  """Rotates pairs (i, i + D/2) of x by angle; optionally scales pair i by scale.

  x [B, L, H, D] (any float dtype), angle/scale [B, L, D/2] float32; computes in
  float32 and returns x's dtype.
  """
  d = x_BLHD.shape[-1]
  if d % 2:
    raise ValueError(f"rotary encodings need an even head dim, got {d}")
  cos_BLF, sin_BLF = jnp.cos(angle_BLF), jnp.sin(angle_BLF)
  if scale_BLF is not None:
    cos_BLF, sin_BLF = cos_BLF * scale_BLF, sin_BLF * scale_BLF
  cos_BL1D = jnp.concatenate([cos_BLF, cos_BLF], -1)[:, :, None, :]
  sin_BL1D = jnp.concatenate([sin_BLF, sin_BLF], -1)[:, :, None, :]
  x32 = x_BLHD.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * cos_BL1D + rotated * sin_BL1D).astype(x_BLHD.dtype)


def apply_rope(x_BLHD, pos_BL, base: float, scaling: S.RopeScaling = S.RopeScaling(),
               train_length: int = 0):
  """Rotates x by angle pos * base^(-2i/D); positions may be any integers (inter ids).

  With `scaling` the frequencies are stretched and x is multiplied by its
  attention factor (YaRN's sqrt(1/t)); `train_length` is YaRN's default L.
  """
  factor = scaling.attention_factor
  return rotate(x_BLHD, rope_angles(pos_BL, x_BLHD.shape[-1], base, scaling, train_length),
                None if factor == 1.0 else jnp.float32(factor))


@dataclasses.dataclass(frozen=True)
class RopeParams(P.Params):
  """Frequency i of D/2 turns by rope_base^(-2i/D) per position; rope_scaling
  stretches them (max_positions, the training length, is YaRN's default L)."""
  rope_base: float = 10000.0
  rope_scaling: S.RopeScaling = S.RopeScaling()
  max_positions: int = dataclasses.field(default=1024, metadata={"key": "data.seq_len"})

  def __post_init__(self):
    P.positive("rope_base", self.rope_base)
    if not isinstance(self.rope_scaling, S.RopeScaling):
      raise P.ParamError(f"pe.rope_scaling={self.rope_scaling!r} must be the "
                         "pe.rope_scaling.* keys")

  @property
  def scaling(self) -> dict:
    """apply_rope's scaling keyword arguments."""
    return dict(scaling=self.rope_scaling, train_length=self.max_positions)


@dataclasses.dataclass(frozen=True)
class RopeRelative(Relative):
  params_cls = RopeParams
  rotary = True

  def rotate(self, p, q_BLHD, k_BLKD, pos_BL):
    return (apply_rope(q_BLHD, pos_BL, p.rope_base, **p.scaling),
            apply_rope(k_BLKD, pos_BL, p.rope_base, **p.scaling))
