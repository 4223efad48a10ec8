"""Runs an attention kernel under `jax.shard_map`: batch over data-like axes, heads over `tensor`.

Attention is independent per (batch row, head), so each device runs the
kernel on its own rows and heads with no communication. The mesh is the one
passed in or the one active in context (`jax.set_mesh`).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import flax.struct
import jax
from jax.sharding import PartitionSpec as P

from bipe_jax.attention.bias import Bias

HEAD_AXIS = "tensor"
_log = logging.getLogger(__name__)


def active_mesh(mesh=None):
  """`mesh`, else the context mesh; None when there is none or it has one device."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(_free_axes(mesh).values()) == 1:
    return None
  return mesh


def _free_axes(mesh) -> dict:
  """Axis name -> size, for axes not already manual (we may be inside a shard_map)."""
  manual = set(getattr(mesh, "manual_axes", ()))
  return {a: n for a, n in mesh.shape.items() if a not in manual}


def plan(mesh, batch: int, heads: int, kv_heads: int, batch_axes=None):
  """(batch axes, head axis or None) that divide the shapes; others replicate.

  Batch axes default to every free axis but `tensor`, taken greedily while
  their product divides the batch.
  """
  free = _free_axes(mesh)
  if batch_axes is None:
    batch_axes = [a for a in free if a != HEAD_AXIS]
  used, prod = [], 1
  for a in batch_axes:
    if a in free and free[a] > 1 and batch % (prod * free[a]) == 0:
      used.append(a)
      prod *= free[a]
  head = None
  if free.get(HEAD_AXIS, 1) > 1:
    n = free[HEAD_AXIS]
    if heads % n == 0 and kv_heads % n == 0:
      head = HEAD_AXIS
    else:
      _log.warning("attention: %d heads / %d kv heads do not divide mesh axis %r of size %d;"
                   " heads are replicated over it", heads, kv_heads, HEAD_AXIS, n)
  return tuple(used), head


@flax.struct.dataclass
class _LocalHeads:
  """A replicated bias whose `.block` keeps only this device's heads."""
  inner: object
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


def _bias_specs(bias, batch_spec, head):
  """PartitionSpecs for a bias pytree: positions by batch; ALiBi slopes by head."""
  specs = jax.tree.map(lambda _: P(), bias)
  pos = P(batch_spec, None)
  if isinstance(bias, Bias):
    return specs.replace(slopes_H=P(head), q_pos_BT=pos, k_pos_BS=pos)
  return dataclasses.replace(specs, q_pos_BT=pos, k_pos_BS=pos)


def sharded(kernel, mesh=None, batch_axes=None):
  """`kernel` wrapped to run under shard_map on `mesh` (or the context mesh).

  Returns a function with the kernel's signature (q_offset a Python int).
  Without an active mesh of more than one device it calls the kernel directly.
  """
  def call(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0):
    m = active_mesh(mesh)
    if m is None:
      return kernel(q_BTHD, k_BSKD, v_BSKD, q_doc_BT=q_doc_BT, k_doc_BS=k_doc_BS,
                    bias=bias, q_offset=q_offset)
    b, _, h, _ = q_BTHD.shape
    axes, head = plan(m, b, h, k_BSKD.shape[2], batch_axes)
    bspec = axes if axes else None
    qkv = P(bspec, None, head, None)
    doc = P(bspec, None)
    n_local = h // m.shape[head] if head else h
    bias_spec = P() if bias is None else _bias_specs(bias, bspec, head)

    def body(q, k, v, qd, kd, bi):
      if bi is not None and head and not isinstance(bi, Bias):
        bi = _LocalHeads(bi, n_local, head)
      return kernel(q, k, v, q_doc_BT=qd, k_doc_BS=kd, bias=bi, q_offset=q_offset)

    fn = jax.shard_map(body, mesh=m, in_specs=(qkv, qkv, qkv, doc, doc, bias_spec),
                       out_specs=qkv, check_vma=False)
    return fn(q_BTHD, k_BSKD, v_BSKD, q_doc_BT, k_doc_BS, bias)

  return call
