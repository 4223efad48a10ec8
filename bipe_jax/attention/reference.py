"""Dense XLA attention: the oracle every other implementation is tested against."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bipe_jax.attention.bias import Bias

NEG_INF = -1e30


def mask(q_doc_BT, k_doc_BS, q_offset: int = 0):
  """[B, 1, T, S] bool: causal (query i sits at index i + q_offset) and same document."""
  t, s = q_doc_BT.shape[1], k_doc_BS.shape[1]
  causal_TS = (jnp.arange(t)[:, None] + q_offset) >= jnp.arange(s)[None, :]
  same_doc_BTS = q_doc_BT[:, :, None] == k_doc_BS[:, None, :]
  return (causal_TS[None] & same_doc_BTS)[:, None]


def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS,
              bias: Bias | None = None, q_offset: int = 0):
  """Causal, document-masked softmax attention with grouped kv heads.

  q [B,T,H,D], k/v [B,S,K,D] with H a multiple of K. Returns [B,T,H,D].
  """
  b, t, h, d = q_BTHD.shape
  kv = k_BSKD.shape[2]
  if h % kv:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kv}")
  q_BTKGD = q_BTHD.reshape(b, t, kv, h // kv, d)
  scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                            preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  scores_BHTS = scores_BKGTS.reshape(b, h, t, -1)
  if bias is not None:
    scores_BHTS = scores_BHTS + bias.full()
  scores_BHTS = jnp.where(mask(q_doc_BT, k_doc_BS, q_offset), scores_BHTS, NEG_INF)
  probs_BKGTS = jax.nn.softmax(scores_BHTS, axis=-1).reshape(scores_BKGTS.shape)
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS.astype(v_BSKD.dtype), v_BSKD)
  return out_BTKGD.reshape(b, t, h, d)
