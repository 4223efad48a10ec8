"""Runs an attention kernel under `jax.shard_map`: batch over data-like axes, heads over `tensor`.

Attention is independent per (batch row, head), so each device runs the
kernel on its own rows and heads with no communication. The mesh is the one
passed in or the one active in context (`jax.set_mesh`). A bias says itself
how it splits (`PositionBias.partition_specs`, `.local_heads`).
"""
from __future__ import annotations

import logging
import math

import jax
from jax.sharding import PartitionSpec as P

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
    bias_spec = P() if bias is None else bias.partition_specs(bspec, head)

    def body(q, k, v, qd, kd, bi):
      if bi is not None and head:
        bi = bi.local_heads(n_local, head)
      return kernel(q, k, v, q_doc_BT=qd, k_doc_BS=kd, bias=bi, q_offset=q_offset)

    fn = jax.shard_map(body, mesh=m, in_specs=(qkv, qkv, qkv, doc, doc, bias_spec),
                       out_specs=qkv, check_vma=False)
    return fn(q_BTHD, k_BSKD, v_BSKD, q_doc_BT, k_doc_BS, bias)

  return call
