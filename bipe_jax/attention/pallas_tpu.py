"""Pallas TPU (Mosaic) flash attention: causal + document mask, in-kernel ALiBi, GQA.

The ALiBi-family bias -m_h (q_pos[i] - k_pos[j]) is computed per tile from
per-token float32 positions and per-head slopes (in SMEM); nothing [T, S] is
ever stored. Layout follows the TPU tiling rules: heads-major [B, H, T, D]
operands, query-side vectors broadcast over the 128 lanes ([B, T, 128]) and
key-side vectors over 8 sublanes ([B, 8, S]); the key block is a multiple of
128. Key blocks above the causal diagonal are skipped and their DMA elided (the
index map repeats the last useful block). Backward: one kernel accumulates
dK/dV over every query block and every query head of the kv group, one
accumulates dQ. Runs on CPU with `interpret=True` (tests).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bipe_jax.attention import flash, tiling

LANES, SUBLANES = 128, 8
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # contract the last dims: a @ b.T


class _Static(NamedTuple):
  scale: float
  bq: int
  bk: int
  groups: int
  interpret: bool


def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0,
              block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
              interpret: bool = False):
  """Causal, document-masked attention; `bias` None or ALiBi `Bias`.

  q [B,T,H,D], k/v [B,S,K,D]; any T, S (padded to the blocks). Returns [B,T,H,D].
  """
  t, h, d = q_BTHD.shape[1:]
  bq = tiling.pick_block(t, block_q, SUBLANES)
  bk = tiling.pick_block(k_BSKD.shape[1], block_k, LANES)
  if bk % LANES:
    raise ValueError(f"pallas_tpu key block {bk} must be a multiple of {LANES}")
  p = flash.prepare("pallas_tpu", q_BTHD, k_BSKD, v_BSKD, q_doc_BT, k_doc_BS, bias,
                    q_offset, bq, bk)
  static = _Static(1.0 / math.sqrt(d), bq, bk, h // k_BSKD.shape[2], interpret)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)
  out = _flash(static, heads_major(p.q), heads_major(p.k), heads_major(p.v), p.q_doc,
               p.k_doc, p.q_pos, p.k_pos, p.slopes, p.off)
  return heads_major(out)[:, :t]


def _lanes(x_N128, width: int):
  """A lane-broadcast [n, 128] array widened or narrowed to [n, width]."""
  if width == LANES:
    return x_N128
  if width < LANES:
    return x_N128[:, :width]
  if width % LANES:
    raise ValueError(f"width {width} must be below or a multiple of {LANES}")
  return jnp.tile(x_N128, (1, width // LANES))


def _col(x_BT):
  return jnp.broadcast_to(x_BT[:, :, None], (*x_BT.shape, LANES))


def _row(x_BS):
  return jnp.broadcast_to(x_BS[:, None, :], (x_BS.shape[0], SUBLANES, x_BS.shape[1]))


def _tile_scores(st, q, k, qd_ref, kd_ref, qp_ref, kp_ref, sl_ref, h, i, j, off):
  """Scaled, biased, masked scores [bq, bk] float32 and the mask."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=_F32) * st.scale
  shape = (st.bq, st.bk)
  rows = lax.broadcasted_iota(jnp.int32, shape, 0) + i * st.bq + off
  cols = lax.broadcasted_iota(jnp.int32, shape, 1) + j * st.bk
  mask = (rows >= cols) & (_lanes(qd_ref[...], st.bk) == kd_ref[:1, :])
  if sl_ref is not None:
    dist = _lanes(qp_ref[...], st.bk) - kp_ref[:1, :]
    s = s - sl_ref[h] * dist
  return jnp.where(mask, s, tiling.NEG_INF), mask


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, qd_ref, kd_ref, qp_ref, kp_ref, sl_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, st, nk):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  off = off_ref[0]
  d = acc_sc.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, tiling.NEG_INF, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  @pl.when(flash.visible(i, j, off, st.bq, st.bk))
  def _step():
    s, mask = _tile_scores(st, q_ref[...], k_ref[...], qd_ref, kd_ref, qp_ref, kp_ref,
                           sl_ref, h, i, j, off)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, s.max(axis=1)[:, None])
    p = jnp.where(mask, jnp.exp(s - _lanes(m_next, st.bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1)[:, None]
    m_sc[...] = m_next
    v = v_ref[...]
    pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=_F32)
    acc_sc[...] = acc_sc[...] * _lanes(alpha, d) + pv

  @pl.when(j == nk - 1)
  def _end():
    l = l_sc[...]
    l_safe = jnp.where(l > 0, l, 1.0)   # rows that see no key (padding) output 0
    o_ref[...] = (acc_sc[...] / _lanes(l_safe, d)).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l_safe)


def _vector_specs(st, has_bias, q_map, k_map):
  """BlockSpecs of q_doc, k_doc, q_pos, k_pos, slopes (the last three None without bias)."""
  q_vec = pl.BlockSpec((None, st.bq, LANES), q_map)
  k_vec = pl.BlockSpec((None, SUBLANES, st.bk), k_map)
  if not has_bias:
    return [q_vec, k_vec, None, None, None]
  return [q_vec, k_vec, q_vec, k_vec, pl.BlockSpec(memory_space=pltpu.SMEM)]


def _vectors(qd, kd, qp, kp, sl):
  has_bias = sl is not None
  return [_col(qd), _row(kd), _col(qp) if has_bias else None,
          _row(kp) if has_bias else None, sl]


def _forward(st, q, k, v, qd, kd, qp, kp, sl, off):
  """out [B,H,Tp,D] and lse [B,H,Tp] float32."""
  b, h, tp, d = q.shape
  nq, nk = tp // st.bq, k.shape[2] // st.bk
  kv_block = lambda i, j, o: jnp.minimum(j, flash.last_k_block(i, o[0], st.bq, st.bk, nk))
  q_map = lambda b_, h_, i, j, o: (b_, h_, i, 0)
  kv_map = lambda b_, h_, i, j, o: (b_, lax.div(h_, st.groups), kv_block(i, j, o), 0)
  in_specs = [pl.BlockSpec((None, None, st.bq, d), q_map),
              pl.BlockSpec((None, None, st.bk, d), kv_map),
              pl.BlockSpec((None, None, st.bk, d), kv_map),
              *_vector_specs(st, sl is not None, lambda b_, h_, i, j, o: (b_, i, 0),
                             lambda b_, h_, i, j, o: (b_, 0, kv_block(i, j, o)))]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, st.bq, d), q_map),
                     pl.BlockSpec((None, None, st.bq, LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((st.bq, LANES), _F32), pltpu.VMEM((st.bq, LANES), _F32),
                          pltpu.VMEM((st.bq, d), _F32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp, LANES), _F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name="bipe_flash_fwd",
  )(off.reshape(1), q, k, v, *_vectors(qd, kd, qp, kp, sl))
  return out, lse[..., 0]


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qd_ref, kd_ref,
                qp_ref, kp_ref, sl_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, st, nq):
  kh, j, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  off = off_ref[0]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

  @pl.when(flash.visible(i, j, off, st.bq, st.bk))
  def _step():
    q, do, v = q_ref[...], do_ref[...], v_ref[...]
    s, mask = _tile_scores(st, q, k_ref[...], qd_ref, kd_ref, qp_ref, kp_ref, sl_ref,
                           kh * st.groups + g, i, j, off)
    p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], st.bk)), 0.0)
    dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=_F32)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    ds = p * (dp - _lanes(delta_ref[...], st.bk))
    dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=_F32) * st.scale

  @pl.when((g == st.groups - 1) & (i == nq - 1))
  def _end():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qd_ref, kd_ref,
               qp_ref, kp_ref, sl_ref, dq_ref, dq_sc, *, st, nk):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  off = off_ref[0]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  @pl.when(flash.visible(i, j, off, st.bq, st.bk))
  def _step():
    k, do = k_ref[...], do_ref[...]
    s, mask = _tile_scores(st, q_ref[...], k, qd_ref, kd_ref, qp_ref, kp_ref, sl_ref,
                           h, i, j, off)
    p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], st.bk)), 0.0)
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=_F32)
    ds = p * (dp - _lanes(delta_ref[...], st.bk))
    dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=_F32) * st.scale

  @pl.when(j == nk - 1)
  def _end():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _backward(st, q, k, v, qd, kd, qp, kp, sl, off, out, lse, do):
  b, h, tp, d = q.shape
  kvh, sp = k.shape[1], k.shape[2]
  nq, nk = tp // st.bq, sp // st.bk
  delta = jnp.einsum("bhtd,bhtd->bht", do.astype(_F32), out.astype(_F32))
  lse_l, delta_l = _col(lse.reshape(b * h, tp)), _col(delta.reshape(b * h, tp))
  lse_l, delta_l = lse_l.reshape(b, h, tp, LANES), delta_l.reshape(b, h, tp, LANES)
  vectors = _vectors(qd, kd, qp, kp, sl)
  off1 = off.reshape(1)
  semantics = ("parallel", "parallel", "parallel", "arbitrary")

  # dK, dV: grid over (batch, kv head, key block, group member, query block).
  q_block = lambda j, i, o: jnp.maximum(i, flash.first_q_block(j, o[0], st.bq, st.bk, nq))
  qh = lambda kh, g: kh * st.groups + g
  q_map = lambda b_, kh, j, g, i, o: (b_, qh(kh, g), q_block(j, i, o), 0)
  kv_map = lambda b_, kh, j, g, i, o: (b_, kh, j, 0)
  q_spec = pl.BlockSpec((None, None, st.bq, d), q_map)
  kv_spec = pl.BlockSpec((None, None, st.bk, d), kv_map)
  row_spec = pl.BlockSpec((None, None, st.bq, LANES), q_map)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, kvh, nk, st.groups, nq),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                    *_vector_specs(st, sl is not None,
                                   lambda b_, kh, j, g, i, o: (b_, q_block(j, i, o), 0),
                                   lambda b_, kh, j, g, i, o: (b_, 0, j))],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((st.bk, d), _F32), pltpu.VMEM((st.bk, d), _F32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics + ("arbitrary",)),
      interpret=st.interpret, name="bipe_flash_dkv",
  )(off1, q, k, v, do, lse_l, delta_l, *vectors)

  # dQ: grid over (batch, head, query block, key block).
  kv_block = lambda i, j, o: jnp.minimum(j, flash.last_k_block(i, o[0], st.bq, st.bk, nk))
  q_map = lambda b_, h_, i, j, o: (b_, h_, i, 0)
  kv_map = lambda b_, h_, i, j, o: (b_, lax.div(h_, st.groups), kv_block(i, j, o), 0)
  q_spec = pl.BlockSpec((None, None, st.bq, d), q_map)
  kv_spec = pl.BlockSpec((None, None, st.bk, d), kv_map)
  row_spec = pl.BlockSpec((None, None, st.bq, LANES), q_map)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                    *_vector_specs(st, sl is not None, lambda b_, h_, i, j, o: (b_, i, 0),
                                   lambda b_, h_, i, j, o: (b_, 0, kv_block(i, j, o)))],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((st.bq, d), _F32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=st.interpret, name="bipe_flash_dq",
  )(off1, q, k, v, do, lse_l, delta_l, *vectors)
  return dq, dk, dv


_flash = flash.make_vjp(_forward, _backward, "pallas_tpu")
