"""Dense attention that saves its probabilities: the fast CPU path for short sequences.

Up to a few thousand keys the [B, H, T, S] float32 probabilities fit in
memory, so the backward pass reads the saved ones instead of recomputing every
score tile as the chunked kernel must. Queries are cut into static row blocks
of `row_block`; block i scores only the keys its causal mask can leave visible
(the first q_offset + end_i), which skips about 3/8 of the score work at 4
blocks. Every [t, s] matrix is contracted over its minor (key) axis or used as
the [K, N] operand: dk and dv are formed transposed ([D, S] = q^T ds,
do^T p), because a contraction over the query axis of ds or p makes XLA:CPU
transpose the whole matrix first (3.4x slower for [12, 1024, 1024]; see
BENCHMARKS.md).

Same results as `reference`; any `PositionBias` works, and its floating-point
leaves receive gradients when differentiated (a learned bias); positions get
none.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bipe_jax import windowed
from bipe_jax.attention import tiling

ROW_BLOCK = 256
_F32 = jnp.float32


class _Static(NamedTuple):
  treedef: Any           # of the bias pytree, None without bias
  scale: float
  rows: tuple            # ((start, end, visible keys), ...) per query block


def row_blocks(t: int, s: int, q_offset, row_block: int = ROW_BLOCK) -> tuple:
  """Static (start, end, keys) per query block; one full block for a traced offset."""
  if not isinstance(q_offset, int):
    return ((0, t, s),)
  return tuple((i, min(i + row_block, t), max(1, min(s, q_offset + min(i + row_block, t))))
               for i in range(0, t, row_block))


def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0,
              row_block: int = ROW_BLOCK):
  """Causal, document-masked attention with grouped kv heads; saves [B,H,T,S] probabilities.

  q [B,T,H,D], k/v [B,S,K,D] (H a multiple of K), doc ids [B,T] / [B,S];
  query i sits at absolute index i + q_offset (an int or a traced scalar).
  Returns [B,T,H,D] in q's dtype.
  """
  b, t, h, d = q_BTHD.shape
  s, kv = k_BSKD.shape[1], k_BSKD.shape[2]
  if h % kv:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kv}")
  q_BKGTD = q_BTHD.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  k_BKSD, v_BKSD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
  leaves, treedef = ([], None) if bias is None else jax.tree.flatten(bias)
  static = _Static(treedef, 1.0 / math.sqrt(d), row_blocks(t, s, q_offset, row_block))
  out_BKGTD = _dense(static, q_BKGTD, k_BKSD, v_BKSD, jnp.asarray(q_doc_BT),
                     jnp.asarray(k_doc_BS), leaves, tiling.q_offset_array(q_offset))
  return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _bias_block(static, leaves, start, end, keys):
  bias = static.treedef.unflatten(leaves)
  return bias.block(bias.q_pos_BT[:, start:end], bias.k_pos_BS[:, :keys]).astype(_F32)


def _probs(static, q, k, qd, kd, leaves, q_off, start, end, keys):
  """Softmax probabilities [B,K,G,t,keys] float32 of query rows start:end."""
  b, kv, g = q.shape[:3]
  s = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, start:end], k[:, :, :keys],
                 preferred_element_type=_F32) * static.scale
  if static.treedef is not None:
    s = s + _bias_block(static, leaves, start, end, keys).reshape(s.shape)
  causal = (jnp.arange(start, end) + q_off)[:, None] >= jnp.arange(keys)[None, :]
  visible = causal[None] & (qd[:, start:end, None] == kd[:, None, :keys])
  s = jnp.where(visible[:, None, None], s, tiling.NEG_INF)
  # jax.nn.softmax's arithmetic, with the row max and sum in windows (bipe_jax/windowed.py).
  e = jnp.exp(s - windowed.reduce_last_axis(s, jnp.max, keepdims=True))
  return e / windowed.reduce_last_axis(e, jnp.sum, keepdims=True)


def _forward(static, q, k, v, qd, kd, leaves, q_off):
  probs, outs = [], []
  for start, end, keys in static.rows:
    p = _probs(static, q, k, qd, kd, leaves, q_off, start, end, keys)
    probs.append(p)
    outs.append(jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v[:, :, :keys],
                           preferred_element_type=_F32).astype(q.dtype))
  return jnp.concatenate(outs, axis=3), probs


def _backward(static, res, do):
  """Gradients for q, k, v and the perturbed bias leaves from the saved probabilities."""
  q, k, v, qd, kd, leaves, pert_leaves, q_off, out, probs = res
  b, kv, g = q.shape[:3]
  pert_idx = [n for n, x in enumerate(pert_leaves) if x is not None]
  delta = jnp.einsum("...d,...d->...", do.astype(_F32), out.astype(_F32))
  dk_T = jnp.zeros((b, kv, k.shape[3], k.shape[2]), _F32)    # [B,K,D,S]
  dv_T = jnp.zeros((b, kv, v.shape[3], v.shape[2]), _F32)
  dq_blocks, dbias = [], [jnp.zeros_like(leaves[n], _F32) for n in pert_idx]
  for (start, end, keys), p in zip(static.rows, probs):
    do_i, q_i = do[:, :, :, start:end], q[:, :, :, start:end]
    dv_T = dv_T.at[..., :keys].add(jnp.einsum("bkgtd,bkgts->bkds", do_i, p.astype(do.dtype),
                                              preferred_element_type=_F32))
    dp = jnp.einsum("bkgtd,bksd->bkgts", do_i, v[:, :, :keys], preferred_element_type=_F32)
    ds = p * (dp - delta[:, :, :, start:end, None])
    ds_c = ds.astype(q.dtype)
    dq_blocks.append(jnp.einsum("bkgts,bksd->bkgtd", ds_c, k[:, :, :keys],
                                preferred_element_type=_F32) * static.scale)
    dk_T = dk_T.at[..., :keys].add(jnp.einsum("bkgtd,bkgts->bkds", q_i, ds_c,
                                              preferred_element_type=_F32) * static.scale)
    if pert_idx:
      def block(sub, start=start, end=end, keys=keys):
        lv = list(leaves)
        for n, x in zip(pert_idx, sub):
          lv[n] = x
        return _bias_block(static, lv, start, end, keys)
      _, vjp = jax.vjp(block, [leaves[n] for n in pert_idx])
      dbias = jax.tree.map(jnp.add, dbias, vjp(ds.reshape(b, -1, end - start, keys))[0])
  dleaves = [None] * len(leaves)
  for n, x in zip(pert_idx, dbias):
    dleaves[n] = x.astype(leaves[n].dtype)
  dq = jnp.concatenate(dq_blocks, axis=3).astype(q.dtype)
  dk, dv = dk_T.swapaxes(2, 3).astype(k.dtype), dv_T.swapaxes(2, 3).astype(v.dtype)
  return dq, dk, dv, dleaves


def _fwd(static, q, k, v, qd, kd, leaves, q_off):
  # Which bias leaves are differentiated is static: None marks the others.
  pert_leaves = [x.value if x.perturbed else None for x in leaves]
  q, k, v, qd, kd, leaves, q_off = jax.tree.map(lambda x: x.value,
                                                (q, k, v, qd, kd, leaves, q_off))
  out, probs = _forward(static, q, k, v, qd, kd, leaves, q_off)
  return out, (q, k, v, qd, kd, leaves, pert_leaves, q_off, out, probs)


def _bwd(static, res, do):
  do = tiling.value_or_zeros(do, res[8])
  dq, dk, dv, dleaves = _backward(static, res, do)
  return dq, dk, dv, None, None, dleaves, None


_dense = jax.custom_vjp(lambda static, *args: _forward(static, *args)[0], nondiff_argnums=(0,))
_dense.defvjp(_fwd, _bwd, symbolic_zeros=True)
