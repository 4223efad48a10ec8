"""FIRE (Li et al. 2023): functional interpolation for relative positions.

For query position i and key position j, head h gets the additive bias

  b_h(i, j) = f_h( psi(i - j) / (psi(max(i, L)) + eps) ),   psi(x) = log(|c x| + 1)

where f: R -> R^H is a two-layer ReLU MLP (1 -> hidden -> H, with biases),
c > 0 a learned scalar (init 0.1) amplifying local differences through the
log, and L = |L_mult * L_init| a learned threshold (L_mult init 1) below which
the query position does not normalise: "progressive interpolation" maps any
distance into [0, 1] relative to the query's own position, so longer inputs
interpolate instead of extrapolating. Positions are the flat index or, for
`bipe_fire`, the segment index. Each layer owns its FIRE parameters.

`FireBias` is an `attention.PositionBias`, so blockwise kernels evaluate it
tile by tile; under shard_map its parameters are replicated and each device
keeps its own heads (the interface's defaults).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bipe_jax.attention.bias import PositionBias
from bipe_jax.encodings import params as P
from bipe_jax.encodings.kind import Relative

FIRE_EPS = 1e-6


@flax.struct.dataclass
class FireBias(PositionBias):
  """FIRE parameters plus per-token positions; never materialised as [L, L].

  c, threshold: scalars; w1_W, b1_W: first layer [hidden]; w2_WH [hidden, H],
  b2_H [H]; q_pos_BT / k_pos_BS float32 positions.
  """
  c: jnp.ndarray
  threshold: jnp.ndarray
  w1_W: jnp.ndarray
  b1_W: jnp.ndarray
  w2_WH: jnp.ndarray
  b2_H: jnp.ndarray
  q_pos_BT: jnp.ndarray
  k_pos_BS: jnp.ndarray
  eps: float = flax.struct.field(pytree_node=False, default=FIRE_EPS)

  def normalized_distance(self, q_pos_Bt, k_pos_Bs):
    """[B, t, s] float32 MLP input psi(i - j) / (psi(max(i, L)) + eps)."""
    c = self.c.astype(jnp.float32)
    psi = lambda x: jnp.log(jnp.abs(c * x) + 1.0)
    q_Bt1 = q_pos_Bt.astype(jnp.float32)[:, :, None]
    k_B1s = k_pos_Bs.astype(jnp.float32)[:, None, :]
    norm_Bt1 = psi(jnp.maximum(q_Bt1, self.threshold.astype(jnp.float32))) + self.eps
    return psi(q_Bt1 - k_B1s) / norm_Bt1

  def block(self, q_pos_Bt, k_pos_Bs):
    """Bias for one tile of positions: [B, H, t, s] float32."""
    x_Bts = self.normalized_distance(q_pos_Bt, k_pos_Bs)
    f32 = lambda a: a.astype(jnp.float32)
    h_BtsW = jax.nn.relu(x_Bts[..., None] * f32(self.w1_W) + f32(self.b1_W))
    out_BHts = jnp.einsum("btsw,wh->bhts", h_BtsW, f32(self.w2_WH))
    return out_BHts + f32(self.b2_H)[None, :, None, None]


def _uniform(bound: float):
  # torch.nn.Linear's default init, as in the reference implementation.
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Fire(nn.Module):
  """Owns one layer's FIRE parameters; returns a FireBias over `pos_BL`."""
  n_heads: int
  hidden: int
  init_c: float
  init_threshold: float
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, pos_BL) -> FireBias:
    part = nn.with_logical_partitioning
    c = self.param("c", part(nn.initializers.constant(self.init_c), ()), (),
                   self.param_dtype)
    l_mult = self.param("threshold_multiplier", part(nn.initializers.ones, ()), (),
                        self.param_dtype)
    w1 = self.param("hidden_kernel", part(_uniform(1.0), ("fire_hidden",)),
                    (self.hidden,), self.param_dtype)
    b1 = self.param("hidden_bias", part(_uniform(1.0), ("fire_hidden",)),
                    (self.hidden,), self.param_dtype)
    bound = self.hidden ** -0.5
    w2 = self.param("out_kernel", part(_uniform(bound), ("fire_hidden", "heads")),
                    (self.hidden, self.n_heads), self.param_dtype)
    b2 = self.param("out_bias", part(_uniform(bound), ("heads",)),
                    (self.n_heads,), self.param_dtype)
    threshold = jnp.abs(l_mult.astype(jnp.float32) * self.init_threshold)
    pos32_BL = pos_BL.astype(jnp.float32)
    return FireBias(c, threshold, w1, b1, w2, b2, pos32_BL, pos32_BL)


@dataclasses.dataclass(frozen=True)
class FireParams(P.Params):
  """FIRE MLP width and the initial values of its learned scalars c and L."""
  fire_hidden: int = 32               # width of the MLP
  fire_init_c: float = 0.1            # initial c of psi(x) = log(|c x| + 1)
  fire_init_threshold: float = 512.0  # initial threshold L of the normaliser psi(max(i, L))

  def __post_init__(self):
    P.positive("fire_hidden", self.fire_hidden)
    P.positive("fire_init_c", self.fire_init_c)
    P.positive("fire_init_threshold", self.fire_init_threshold)


@dataclasses.dataclass(frozen=True)
class FireRelative(Relative):
  params_cls = FireParams
  bias_kind = FireBias.kernel_kind

  def bias(self, p, pos_BL, n_heads: int, param_dtype: str):
    return Fire(n_heads, p.fire_hidden, p.fire_init_c, p.fire_init_threshold,
                param_dtype, name="fire")(pos_BL)
