"""xPos (Sun et al. 2022): RoPE whose score decays exponentially with distance.

Frequency i gets zeta_i = (2i/D + 0.4) / 1.4 in (0, 1). Queries are scaled by
zeta^(n/scale_base) and keys by zeta^(-m/scale_base), so the score of query n
and key m carries zeta^((n-m)/scale_base): a decay in the relative distance
only, applied here in the rotate-half layout (pair (i, i + D/2) <-> frequency i).

`center` is subtracted from positions inside the scale only: it cancels in
the score and keeps zeta^(+-pos/scale_base) inside float32 range for long
inputs (torchscale centres the same way).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bipe_jax.encodings import params as P
from bipe_jax.encodings.rope import RopeParams, RopeRelative, rope_angles, rotate
from bipe_jax.encodings.rope_scaling import RopeScaling


def xpos_zeta(head_dim: int):
  """[D/2] float32 per-frequency decay bases zeta_i = (2i/D + 0.4) / 1.4."""
  return (jnp.arange(0, head_dim, 2, dtype=jnp.float32) + 0.4 * head_dim) / (1.4 * head_dim)


def apply_xpos(x_BLHD, pos_BL, *, key: bool, base: float, scale_base: float,
               center: float = 0.0, scaling: RopeScaling = RopeScaling(), train_length: int = 0):
  """Rotates like RoPE and scales by zeta^(+-(pos - center)/scale_base).

  x [B, L, H, D]; pos [B, L] ints; key=False for queries (scale up),
  key=True for keys (scale down). `scaling` stretches the rotation as in
  rope.apply_rope (the decay is left as it is). Returns x's dtype.
  """
  d = x_BLHD.shape[-1]
  rel_BL = pos_BL.astype(jnp.float32) - jnp.float32(center)
  power_BL1 = (rel_BL / scale_base)[..., None]
  scale_BLF = xpos_zeta(d) ** (-power_BL1 if key else power_BL1) * scaling.attention_factor
  return rotate(x_BLHD, rope_angles(pos_BL, d, base, scaling, train_length), scale_BLF)


@dataclasses.dataclass(frozen=True)
class XposParams(RopeParams):
  """RoPE plus the per-frequency exponential decay zeta^((i-j)/xpos_scale_base)."""
  xpos_scale_base: float = 512.0      # the score decays by zeta^(distance / this)

  def __post_init__(self):
    super().__post_init__()
    P.positive("xpos_scale_base", self.xpos_scale_base)


@dataclasses.dataclass(frozen=True)
class XposRelative(RopeRelative):
  params_cls = XposParams

  def rotate(self, p, q_BLHD, k_BLKD, pos_BL):
    return self.rotate_span(p, q_BLHD, k_BLKD, pos_BL, q_BLHD.shape[1])

  def rotate_span(self, p, q_BLHD, k_BLKD, pos_BL, span: int):
    # The centre cancels in the score; a piece of a sequence centres on the whole.
    kw = dict(base=p.rope_base, scale_base=p.xpos_scale_base, center=span // 2,
              **p.scaling)
    return (apply_xpos(q_BLHD, pos_BL, key=False, **kw),
            apply_xpos(k_BLKD, pos_BL, key=True, **kw))
