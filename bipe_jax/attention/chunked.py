"""Blockwise online-softmax attention in plain JAX: memory linear in sequence length.

Queries are processed one block at a time (`lax.scan`); for each, a loop visits
only the key blocks the causal mask leaves visible, keeping a running max,
normaliser and output (the online softmax of FlashAttention). Each tile is one
of three kinds, chosen at run time (`lax.switch`): wholly visible (below the
diagonal, one document: no mask is built), partly masked, or wholly masked by
documents (skipped). The backward pass is a custom VJP that recomputes each
score tile from q, k, v and the saved log-sum-exp, so nothing of size [T, S]
is stored in either direction.

Any bias object with `.block(q_pos_Bt, k_pos_Bs) -> [B, H, t, s]` works (ALiBi
family, FIRE, ...). Its floating-point leaves receive gradients when they are
being differentiated (a learned bias); positions are data and get none.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bipe_jax.attention import tiling

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
_F32 = jnp.float32


class _Static(NamedTuple):
  treedef: Any      # of the bias pytree, None without bias
  scale: float


def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0,
              block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
  """Causal, document-masked attention with grouped kv heads, O(L) memory.

  q [B,T,H,D], k/v [B,S,K,D] (H a multiple of K), doc ids [B,T] / [B,S];
  query i sits at absolute index i + q_offset (an int or a traced scalar).
  Returns [B,T,H,D] in q's dtype. Any T, S: padded internally to the blocks.
  """
  b, t, h, d = q_BTHD.shape
  s, kv = k_BSKD.shape[1], k_BSKD.shape[2]
  if h % kv:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kv}")
  g = h // kv
  bq, bk = tiling.pick_block(t, block_q), tiling.pick_block(s, block_k)
  tp, sp = tiling.round_up(t, bq), tiling.round_up(s, bk)
  nq, nk = tp // bq, sp // bk

  q_blocks = tiling.pad_to(q_BTHD, 1, tp).reshape(b, nq, bq, kv, g, d).transpose(1, 0, 3, 4, 2, 5)
  to_kv_blocks = lambda x: tiling.pad_to(x, 1, sp).reshape(b, nk, bk, kv, d).transpose(1, 0, 3, 2, 4)
  qd_blocks = tiling.pad_to(q_doc_BT, 1, tp, tiling.PAD_Q_DOC).reshape(b, nq, bq).transpose(1, 0, 2)
  kd_blocks = tiling.pad_to(k_doc_BS, 1, sp, tiling.PAD_K_DOC).reshape(b, nk, bk).transpose(1, 0, 2)
  if bias is None:
    qp_blocks = kp_blocks = None
    leaves, treedef = [], None
  else:
    qp_blocks = tiling.pad_to(bias.q_pos_BT, 1, tp).reshape(b, nq, bq).transpose(1, 0, 2)
    kp_blocks = tiling.pad_to(bias.k_pos_BS, 1, sp).reshape(b, nk, bk).transpose(1, 0, 2)
    leaves, treedef = jax.tree.flatten(bias)
  static = _Static(treedef, 1.0 / math.sqrt(d))
  out_blocks = _blockwise(static, q_blocks, to_kv_blocks(k_BSKD), to_kv_blocks(v_BSKD),
                          qd_blocks, kd_blocks, qp_blocks, kp_blocks, leaves,
                          tiling.q_offset_array(q_offset))
  return out_blocks.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, h, d)[:, :t]


def _scores(static, leaves, q_i, k_j, qd_i, kd_j, qp_i, kp_j, i, j, q_off, masked: bool):
  """Scaled, biased scores [B,K,G,t,s] float32 of one tile; masked ones are NEG_INF."""
  b, kv, g, bq, _ = q_i.shape
  bk = k_j.shape[2]
  s = jnp.einsum("bkgtd,bksd->bkgts", q_i, k_j, preferred_element_type=_F32) * static.scale
  if static.treedef is not None:
    bias_BHts = static.treedef.unflatten(leaves).block(qp_i, kp_j)
    s = s + bias_BHts.astype(_F32).reshape(s.shape)
  if not masked:
    return s
  q_idx = i * bq + jnp.arange(bq) + q_off
  k_idx = j * bk + jnp.arange(bk)
  mask = (q_idx[:, None] >= k_idx[None, :])[None] & (qd_i[:, :, None] == kd_j[:, None, :])
  return jnp.where(mask[:, None, None], s, tiling.NEG_INF)


def _tile_kind(qd_i, kd_j, i, j, bq, bk, q_off):
  """0: every pair visible (no mask needed), 1: partly masked, 2: nothing visible.

  A tile needs no mask when its last key precedes its first query and every
  token of it belongs to one document (per row); it is skipped when the
  document ranges of its queries and keys do not overlap in any row.
  """
  below_diagonal = j * bk + bk - 1 <= i * bq + q_off
  q_lo, q_hi = qd_i.min(axis=1), qd_i.max(axis=1)
  k_lo, k_hi = kd_j.min(axis=1), kd_j.max(axis=1)
  one_doc = jnp.all((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo))
  disjoint = jnp.all((k_hi < q_lo) | (k_lo > q_hi))
  return jnp.where(disjoint, 2, jnp.where(below_diagonal & one_doc, 0, 1))


def _forward(static, q, k, v, qd, kd, qp, kp, leaves, q_off):
  """out [nq,B,K,G,bq,D] (q dtype) and lse [nq,B,K,G,bq] float32."""
  nq, b, kv, g, bq, d = q.shape
  nk, bk = k.shape[0], k.shape[3]

  def q_step(_, xs):
    i, q_i, qd_i, qp_i = xs
    # Key blocks whose first index is <= the block's last query index.
    hi = jnp.clip((i * bq + bq - 1 + q_off) // bk + 1, 0, nk)

    def kv_step(j, carry):
      kp_j = None if kp is None else kp[j]

      def update(masked):
        def run(carry):
          m, l, acc = carry
          s = _scores(static, leaves, q_i, k[j], qd_i, kd[j], qp_i, kp_j, i, j, q_off, masked)
          m_new = jnp.maximum(m, s.max(-1))
          # Masked scores give exp(NEG_INF - m_new) = 0 once a row has seen a real
          # key; before that m_new is NEG_INF too and the junk they add is scaled
          # away by alpha = exp(NEG_INF - m_real) = 0 at the row's first real key.
          p = jnp.exp(s - m_new[..., None])
          alpha = jnp.exp(m - m_new)
          pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v[j],
                          preferred_element_type=_F32)
          return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv
        return run

      kind = _tile_kind(qd_i, kd[j], i, j, bq, bk, q_off)
      return lax.switch(kind, (update(False), update(True), lambda c: c), carry)

    init = (jnp.full((b, kv, g, bq), tiling.NEG_INF, _F32), jnp.zeros((b, kv, g, bq), _F32),
            jnp.zeros((b, kv, g, bq, d), _F32))
    m, l, acc = lax.fori_loop(0, hi, kv_step, init)
    # Rows that saw no key (padding) output 0 and get lse = +inf-like, so the
    # backward's exp(s - lse) is 0 for them without a mask.
    seen = m > tiling.NEG_INF / 2
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0).astype(q.dtype)
    return None, (out, jnp.where(seen, m + jnp.log(l_safe), -tiling.NEG_INF))

  _, (out, lse) = lax.scan(q_step, None, (jnp.arange(nq), q, qd, qp))
  return out, lse


def _backward(static, res, do):
  """Gradients for q, k, v and the perturbed bias leaves, recomputing each tile."""
  q, k, v, qd, kd, qp, kp, leaves, pert_leaves, q_off, out, lse = res
  nq, b, kv, g, bq, d = q.shape
  nk, bk = k.shape[0], k.shape[3]
  pert_idx = [n for n, x in enumerate(pert_leaves) if x is not None]
  delta = jnp.einsum("...d,...d->...", do.astype(_F32), out.astype(_F32))

  def bias_grad(ds, qp_i, kp_j):
    """Cotangents of the perturbed bias leaves for one tile of score gradients."""
    def block(sub):
      lv = list(leaves)
      for n, x in zip(pert_idx, sub):
        lv[n] = x
      return static.treedef.unflatten(lv).block(qp_i, kp_j).astype(_F32)
    _, vjp = jax.vjp(block, [leaves[n] for n in pert_idx])
    return vjp(ds.reshape(b, kv * g, bq, bk))[0]

  def k_step(carry, xs):
    dq_acc, dbias = carry
    j, k_j, v_j, kd_j, kp_j = xs
    lo = jnp.clip((j * bk - q_off) // bq, 0, nq)   # first query block that sees key block j

    def tile_grads(masked):
      def run(i, inner):
        dq_acc, dk_j, dv_j, dbias = inner
        q_i, do_i = q[i], do[i]
        qp_i = None if qp is None else qp[i]
        s = _scores(static, leaves, q_i, k_j, qd[i], kd_j, qp_i, kp_j, i, j, q_off, masked)
        p = jnp.exp(s - lse[i][..., None])   # masked scores are NEG_INF: p = 0
        # dk, dv are accumulated as [D, s]: contracting p or ds over their query
        # axis would make XLA:CPU transpose the whole tile first.
        dv_j = dv_j + jnp.einsum("bkgtd,bkgts->bkds", do_i, p.astype(do.dtype),
                                 preferred_element_type=_F32)
        dp = jnp.einsum("bkgtd,bksd->bkgts", do_i, v_j, preferred_element_type=_F32)
        ds = p * (dp - delta[i][..., None])
        ds_c = ds.astype(q.dtype)
        dq_i = jnp.einsum("bkgts,bksd->bkgtd", ds_c, k_j, preferred_element_type=_F32)
        dq_acc = lax.dynamic_update_index_in_dim(
            dq_acc, lax.dynamic_index_in_dim(dq_acc, i, keepdims=False) + dq_i * static.scale, i, 0)
        dk_j = dk_j + jnp.einsum("bkgtd,bkgts->bkds", q_i, ds_c,
                                 preferred_element_type=_F32) * static.scale
        if pert_idx:
          dbias = jax.tree.map(jnp.add, dbias, bias_grad(ds, qp_i, kp_j))
        return dq_acc, dk_j, dv_j, dbias
      return run

    def q_step(i, inner):
      kind = _tile_kind(qd[i], kd_j, i, j, bq, bk, q_off)
      return lax.switch(kind, (tile_grads(False), tile_grads(True), lambda i, c: c), i, inner)

    zeros_kv = jnp.zeros((b, kv, d, bk), _F32)
    dq_acc, dk_j, dv_j, dbias = lax.fori_loop(lo, nq, q_step, (dq_acc, zeros_kv, zeros_kv, dbias))
    return (dq_acc, dbias), (dk_j.swapaxes(2, 3).astype(k.dtype),
                             dv_j.swapaxes(2, 3).astype(v.dtype))

  dbias0 = [jnp.zeros_like(leaves[n], _F32) for n in pert_idx]
  xs = (jnp.arange(nk), k, v, kd, kp)
  (dq, dbias), (dk, dv) = lax.scan(k_step, (jnp.zeros(q.shape, _F32), dbias0), xs)
  dleaves = [None] * len(leaves)
  for n, x in zip(pert_idx, dbias):
    dleaves[n] = x.astype(leaves[n].dtype)
  return dq.astype(q.dtype), dk, dv, dleaves


def _fwd(static, q, k, v, qd, kd, qp, kp, leaves, q_off):
  # Which bias leaves are being differentiated is static: encode it in the
  # residual's structure (None = not perturbed, no gradient computed).
  pert_leaves = [x.value if x.perturbed else None for x in leaves]
  unwrap = lambda tree: jax.tree.map(lambda x: x.value, tree)
  q, k, v, qd, kd, qp, kp, leaves, q_off = unwrap((q, k, v, qd, kd, qp, kp, leaves, q_off))
  out, lse = _forward(static, q, k, v, qd, kd, qp, kp, leaves, q_off)
  return out, (q, k, v, qd, kd, qp, kp, leaves, pert_leaves, q_off, out, lse)


def _bwd(static, res, do):
  do = tiling.value_or_zeros(do, res[-2])
  dq, dk, dv, dleaves = _backward(static, res, do)
  return dq, dk, dv, None, None, None, None, dleaves, None


_blockwise = jax.custom_vjp(lambda static, *args: _forward(static, *args)[0],
                            nondiff_argnums=(0,))
_blockwise.defvjp(_fwd, _bwd, symbolic_zeros=True)
