"""Pallas GPU (Triton) flash attention: causal + document mask, in-kernel ALiBi, GQA.

One program per (query block, batch row, head) keeps its query tile in
registers and streams the kv head's keys and values block by block, up to the
causal diagonal only (online softmax). The ALiBi-family bias
-m_h (q_pos[i] - k_pos[j]) is computed per tile from float32 positions and
the head's slope. Backward: a dK/dV kernel (one program per key block, looping
over the query blocks that see it; per query head, summed over the kv group
afterwards) and a dQ kernel. Operands stay in [B, T, H, D]; the head dim is
padded to a power of two (Triton tiles are powers of two). Runs on CPU with
`interpret=True` (tests).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bipe_jax.attention import flash, tiling

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
MIN_BLOCK = 16   # smallest tile Triton's dot accepts
_F32 = jnp.float32


class _Static(NamedTuple):
  scale: float
  bq: int
  bk: int
  groups: int
  interpret: bool
  num_warps: int
  num_stages: int


def _pow2_block(n: int, block: int) -> int:
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(n)))


def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0,
              block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
              interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Causal, document-masked attention; `bias` None or ALiBi `Bias`.

  q [B,T,H,D], k/v [B,S,K,D]; any T, S, D (padded). Returns [B,T,H,D].
  """
  t, h, d = q_BTHD.shape[1:]
  bq, bk = _pow2_block(t, block_q), _pow2_block(k_BSKD.shape[1], block_k)
  p = flash.prepare("pallas_gpu", q_BTHD, k_BSKD, v_BSKD, q_doc_BT, k_doc_BS, bias,
                    q_offset, bq, bk)
  dp = pl.next_power_of_2(d)
  pad_d = lambda x: tiling.pad_to(x, 3, dp)
  static = _Static(1.0 / math.sqrt(d), bq, bk, h // k_BSKD.shape[2], interpret,
                   num_warps, num_stages)
  out = _flash(static, pad_d(p.q), pad_d(p.k), pad_d(p.v), p.q_doc, p.k_doc, p.q_pos,
               p.k_pos, p.slopes, p.off)
  return out[:, :t, :, :d]


def _scores(st, q, k, rows, cols, qd, kd, qp, kp, slope):
  """Scaled, biased, masked scores [t, s] float32 and the mask."""
  s = plgpu.dot(q, k, trans_b=True).astype(_F32) * st.scale
  mask = (rows[:, None] >= cols[None, :]) & (qd[:, None] == kd[None, :])
  if slope is not None:
    s = s - slope * (qp[:, None] - kp[None, :])
  return jnp.where(mask, s, tiling.NEG_INF), mask


def _load(ref, sl=None):
  if ref is None:
    return None
  return ref[...] if sl is None else ref[sl]


def _fwd_kernel(q_ref, k_ref, v_ref, qd_ref, kd_ref, qp_ref, kp_ref, sl_ref, off_ref,
                o_ref, lse_ref, *, st, nk):
  i = pl.program_id(0)
  off = off_ref[()]
  q, qd, qp = q_ref[...], qd_ref[...], _load(qp_ref)
  slope = None if sl_ref is None else sl_ref[()]
  rows = i * st.bq + jnp.arange(st.bq) + off

  def body(j, carry):
    m, l, acc = carry
    ks = pl.ds(j * st.bk, st.bk)
    cols = j * st.bk + jnp.arange(st.bk)
    s, mask = _scores(st, q, k_ref[ks, :], rows, cols, qd, kd_ref[ks], qp, _load(kp_ref, ks),
                      slope)
    m_next = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    alpha = jnp.exp(m - m_next)
    v = v_ref[ks, :]
    pv = plgpu.dot(p.astype(v.dtype), v).astype(_F32)
    return m_next, alpha * l + p.sum(axis=1), acc * alpha[:, None] + pv

  hi = jnp.minimum(flash.last_k_block(i, off, st.bq, st.bk, nk) + 1, nk)
  init = (jnp.full((st.bq,), tiling.NEG_INF, _F32), jnp.zeros((st.bq,), _F32),
          jnp.zeros((st.bq, q.shape[-1]), _F32))
  m, l, acc = lax.fori_loop(0, hi, body, init)
  l_safe = jnp.where(l > 0, l, 1.0)   # rows that see no key (padding) output 0
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def _vector_specs(has_bias, q_spec, k_spec, head_map):
  """BlockSpecs of q_doc, k_doc, q_pos, k_pos, slope (0-d), q_offset (0-d)."""
  off_spec = pl.BlockSpec((), lambda *_: ())
  if not has_bias:
    return [q_spec, k_spec, None, None, None, off_spec]
  return [q_spec, k_spec, q_spec, k_spec, pl.BlockSpec((None,), head_map), off_spec]


def _params(st):
  return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _forward(st, q, k, v, qd, kd, qp, kp, sl, off):
  """out [B,Tp,H,Dp] and lse [B,H,Tp] float32."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  nq, nk = tp // st.bq, sp // st.bk
  kv_head = lambda h_: lax.div(h_, st.groups)
  q_spec = pl.BlockSpec((None, st.bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda i, b_, h_: (b_, 0, kv_head(h_), 0))
  in_specs = [q_spec, kv_spec, kv_spec,
              *_vector_specs(sl is not None, pl.BlockSpec((None, st.bq), lambda i, b_, h_: (b_, i)),
                             pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0)),
                             lambda i, b_, h_: (h_,))]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nk=nk),
      grid=(nq, b, h), in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, st.bq), lambda i, b_, h_: (b_, h_, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), _F32)],
      compiler_params=_params(st), interpret=st.interpret, name="bipe_flash_fwd",
  )(q, k, v, qd, kd, qp, kp, sl, off)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qd_ref, kd_ref, qp_ref,
                kp_ref, sl_ref, off_ref, dk_ref, dv_ref, *, st, nq):
  j = pl.program_id(0)
  off = off_ref[()]
  k, v, kd, kp = k_ref[...], v_ref[...], kd_ref[...], _load(kp_ref)
  slope = None if sl_ref is None else sl_ref[()]
  cols = j * st.bk + jnp.arange(st.bk)

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(i * st.bq, st.bq)
    q, do = q_ref[qs, :], do_ref[qs, :]
    rows = i * st.bq + jnp.arange(st.bq) + off
    s, mask = _scores(st, q, k, rows, cols, qd_ref[qs], kd, _load(qp_ref, qs), kp, slope)
    p = jnp.where(mask, jnp.exp(s - lse_ref[qs][:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(_F32)
    dp = plgpu.dot(do, v, trans_b=True).astype(_F32)
    ds = p * (dp - delta_ref[qs][:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(_F32) * st.scale
    return dk, dv

  lo = flash.first_q_block(j, off, st.bq, st.bk, nq)
  zeros = jnp.zeros((st.bk, k.shape[-1]), _F32)
  dk, dv = lax.fori_loop(lo, nq, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qd_ref, kd_ref, qp_ref,
               kp_ref, sl_ref, off_ref, dq_ref, *, st, nk):
  i = pl.program_id(0)
  off = off_ref[()]
  q, do, qd, qp = q_ref[...], do_ref[...], qd_ref[...], _load(qp_ref)
  lse, delta = lse_ref[...], delta_ref[...]
  slope = None if sl_ref is None else sl_ref[()]
  rows = i * st.bq + jnp.arange(st.bq) + off

  def body(j, dq):
    ks = pl.ds(j * st.bk, st.bk)
    k = k_ref[ks, :]
    cols = j * st.bk + jnp.arange(st.bk)
    s, mask = _scores(st, q, k, rows, cols, qd, kd_ref[ks], qp, _load(kp_ref, ks), slope)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v_ref[ks, :], trans_b=True).astype(_F32)
    ds = p * (dp - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k).astype(_F32) * st.scale

  hi = jnp.minimum(flash.last_k_block(i, off, st.bq, st.bk, nk) + 1, nk)
  dq = lax.fori_loop(0, hi, body, jnp.zeros((st.bq, q.shape[-1]), _F32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(st, q, k, v, qd, kd, qp, kp, sl, off, out, lse, do):
  b, tp, h, d = q.shape
  sp, kvh = k.shape[1], k.shape[2]
  nq, nk = tp // st.bq, sp // st.bk
  delta = jnp.einsum("bthd,bthd->bht", do.astype(_F32), out.astype(_F32))
  kv_head = lambda h_: lax.div(h_, st.groups)
  has_bias = sl is not None

  # dK, dV per query head: program (key block j, batch, head), all queries resident.
  q_all = pl.BlockSpec((None, tp, None, d), lambda j, b_, h_: (b_, 0, h_, 0))
  kv_blk = pl.BlockSpec((None, st.bk, None, d), lambda j, b_, h_: (b_, j, kv_head(h_), 0))
  row_all = pl.BlockSpec((None, None, tp), lambda j, b_, h_: (b_, h_, 0))
  out_blk = pl.BlockSpec((None, st.bk, None, d), lambda j, b_, h_: (b_, j, h_, 0))
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq),
      grid=(nk, b, h),
      in_specs=[q_all, kv_blk, kv_blk, q_all, row_all, row_all,
                *_vector_specs(has_bias, pl.BlockSpec((None, tp), lambda j, b_, h_: (b_, 0)),
                               pl.BlockSpec((None, st.bk), lambda j, b_, h_: (b_, j)),
                               lambda j, b_, h_: (h_,))],
      out_specs=[out_blk, out_blk],
      out_shape=[jax.ShapeDtypeStruct((b, sp, h, d), _F32)] * 2,
      compiler_params=_params(st), interpret=st.interpret, name="bipe_flash_dkv",
  )(q, k, v, do, lse, delta, qd, kd, qp, kp, sl, off)
  group_sum = lambda x, like: x.reshape(b, sp, kvh, st.groups, d).sum(3).astype(like.dtype)

  # dQ: program (query block i, batch, head), keys streamed up to the diagonal.
  q_blk = pl.BlockSpec((None, st.bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  kv_all = pl.BlockSpec((None, sp, None, d), lambda i, b_, h_: (b_, 0, kv_head(h_), 0))
  row_blk = pl.BlockSpec((None, None, st.bq), lambda i, b_, h_: (b_, h_, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nk=nk),
      grid=(nq, b, h),
      in_specs=[q_blk, kv_all, kv_all, q_blk, row_blk, row_blk,
                *_vector_specs(has_bias, pl.BlockSpec((None, st.bq), lambda i, b_, h_: (b_, i)),
                               pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0)),
                               lambda i, b_, h_: (h_,))],
      out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(st), interpret=st.interpret, name="bipe_flash_dq",
  )(q, k, v, do, lse, delta, qd, kd, qp, kp, sl, off)
  return dq, group_sum(dk_h, k), group_sum(dv_h, v)


_flash = flash.make_vjp(_forward, _backward, "pallas_gpu")
