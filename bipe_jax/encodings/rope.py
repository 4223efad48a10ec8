"""Rotary position embedding in the rotate-half (Llama) layout (Su et al. 2021).

Frequency i (of D/2) rotates the pair of dims (i, i + D/2), the layout of HF
Llama weights, so imported q/k projections need no permutation.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bipe_jax.encodings import params as P
from bipe_jax.encodings.kind import Relative


def rope_angles(pos_BL, head_dim: int, base: float):
  """Angles [B, L, D/2] float32: pos * base^(-2i/D)."""
  inv_freq_F = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return pos_BL.astype(jnp.float32)[..., None] * inv_freq_F


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


def apply_rope(x_BLHD, pos_BL, base: float):
  """Rotates x by angle pos * base^(-2i/D); positions may be any integers (inter ids)."""
  return rotate(x_BLHD, rope_angles(pos_BL, x_BLHD.shape[-1], base))


@dataclasses.dataclass(frozen=True)
class RopeParams(P.Params):
  """Frequency i of D/2 turns by rope_base^(-2i/D) per position."""
  rope_base: float = 10000.0

  def __post_init__(self):
    P.positive("rope_base", self.rope_base)


@dataclasses.dataclass(frozen=True)
class RopeRelative(Relative):
  params_cls = RopeParams
  rotary = True

  def rotate(self, p, q_BLHD, k_BLKD, pos_BL):
    return apply_rope(q_BLHD, pos_BL, p.rope_base), apply_rope(k_BLKD, pos_BL, p.rope_base)
