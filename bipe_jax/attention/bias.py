"""Additive attention biases described by per-token positions, never as [L, L].

Kernels receive a bias object and evaluate `block(q_pos, k_pos)` only for
the score tile they are computing, so a bias costs O(L) memory. Every bias is
a `PositionBias`: encodings build them (bipe_jax.encodings), kernels and
`attention.shard` use them only through this interface, so a new kind of bias
needs no change here or in any kernel.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


class PositionBias:
  """The interface kernels and shard_map see; subclasses are flax.struct dataclasses.

  q_pos_BT [B, T], k_pos_BS [B, S]: float32 positions of queries and keys.
  block(q_pos_Bt, k_pos_Bs) -> [B, H, t, s] float32: the bias of one tile.
  kernel_kind: "alibi" for the slope form the fused (Pallas) kernels evaluate
    in registers (`Bias` only), "other" for anything the blockwise kernels
    evaluate through `block`.
  """
  kernel_kind = "other"

  def block(self, q_pos_Bt, k_pos_Bs):
    raise NotImplementedError

  def with_keys(self, k_pos_BS) -> PositionBias:
    """The same bias against other keys at positions k_pos_BS [B, S] (cached
    decoding: a step's queries against every cached key)."""
    return dataclasses.replace(self, k_pos_BS=k_pos_BS)

  def full(self):
    """[B, H, T, S] float32, for the dense reference kernel."""
    return self.block(self.q_pos_BT, self.k_pos_BS)

  def partition_specs(self, batch_spec, head_axis):
    """PartitionSpecs of this pytree under shard_map: positions split like the
    batch rows, everything else (e.g. learned parameters) replicated."""
    del head_axis
    specs = jax.tree.map(lambda _: P(), self)
    pos = P(batch_spec, None)
    return dataclasses.replace(specs, q_pos_BT=pos, k_pos_BS=pos)

  def local_heads(self, n_local: int, axis: str) -> PositionBias:
    """The bias of this device's `n_local` heads when heads are split over mesh
    `axis`: all heads are computed from the replicated parameters and sliced."""
    return LocalHeads(self, n_local, axis)


@flax.struct.dataclass
class LocalHeads(PositionBias):
  """A replicated bias whose `block` keeps only this device's heads."""
  inner: PositionBias
  n_local: int = flax.struct.field(pytree_node=False)
  axis: str = flax.struct.field(pytree_node=False)

  @property
  def q_pos_BT(self):
    return self.inner.q_pos_BT

  @property
  def k_pos_BS(self):
    return self.inner.k_pos_BS

  def block(self, q_pos_Bt, k_pos_Bs):
    full_BHts = self.inner.block(q_pos_Bt, k_pos_Bs)
    start = jax.lax.axis_index(self.axis) * self.n_local
    return jax.lax.dynamic_slice_in_dim(full_BHts, start, self.n_local, axis=1)


@flax.struct.dataclass
class Bias(PositionBias):
  """ALiBi-family bias: score[b,h,i,j] += -slopes[h] * (q_pos[b,i] - k_pos[b,j]).

  Positions are float32 (inter ids grow without bound; bf16 would round them).
  """
  slopes_H: jnp.ndarray
  q_pos_BT: jnp.ndarray
  k_pos_BS: jnp.ndarray

  kernel_kind = "alibi"

  def block(self, q_pos_Bt, k_pos_Bs):
    """Bias for one tile of positions: [B, H, t, s] float32."""
    dist_Bts = q_pos_Bt[:, :, None].astype(jnp.float32) - k_pos_Bs[:, None, :].astype(jnp.float32)
    return -self.slopes_H[None, :, None, None] * dist_Bts[:, None]

  def partition_specs(self, batch_spec, head_axis):
    """Slopes split like the heads, positions like the batch rows."""
    pos = P(batch_spec, None)
    return Bias(P(head_axis), pos, pos)

  def local_heads(self, n_local: int, axis: str) -> Bias:
    return self  # the slopes are already this device's heads
