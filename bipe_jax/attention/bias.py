"""Additive attention bias described by per-token positions, never as [L, L].

Kernels receive a `Bias` and evaluate `block(q_pos, k_pos)` only for the
score tile they are computing, so the bias costs O(L) memory.
"""
from __future__ import annotations

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class Bias:
  """ALiBi-family bias: score[b,h,i,j] += -slopes[h] * (q_pos[b,i] - k_pos[b,j]).

  Positions are float32 (inter ids grow without bound; bf16 would round them).
  """
  slopes_H: jnp.ndarray
  q_pos_BT: jnp.ndarray
  k_pos_BS: jnp.ndarray

  def block(self, q_pos_Bt, k_pos_Bs):
    """Bias for one tile of positions: [B, H, t, s] float32."""
    dist_Bts = q_pos_Bt[:, :, None].astype(jnp.float32) - k_pos_Bs[:, None, :].astype(jnp.float32)
    return -self.slopes_H[None, :, None, None] * dist_Bts[:, None]

  def full(self):
    return self.block(self.q_pos_BT, self.k_pos_BS)
