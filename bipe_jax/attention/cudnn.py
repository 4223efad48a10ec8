"""cuDNN flash attention (GPU, bf16/fp16) for encodings without an additive bias.

Calls `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`,
whose public interface has no document ids. A batch whose rows each hold a
single document (the release's "windows" packing, and every evaluation) runs
on cuDNN; a batch that packs several documents into a row is sent at run time
(`lax.cond`, no host sync) to the `chunked` kernel, which applies the document
mask. Self-attention only (T == S, q_offset 0): cached decoding uses another
implementation.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from bipe_jax.attention import chunked

_HALF = (jnp.bfloat16, jnp.float16)


def supports(q_BTHD, k_BSKD, bias=None, q_offset=0) -> str | None:
  """None if cuDNN can run this call, else the reason it cannot."""
  if bias is not None:
    return f"cudnn takes no additive bias (got {type(bias).__name__})"
  if jnp.dtype(q_BTHD.dtype) not in _HALF:
    return f"cudnn needs bfloat16 or float16 inputs, got {jnp.dtype(q_BTHD.dtype).name}"
  if q_BTHD.shape[1] != k_BSKD.shape[1] or not (isinstance(q_offset, int) and q_offset == 0):
    return "cudnn runs self-attention only (T == S, q_offset 0)"
  return None


def single_document_rows(q_doc_BT, k_doc_BS):
  """Scalar bool: every row's queries and keys all share one document id."""
  first = k_doc_BS[:, :1]
  return jnp.all(k_doc_BS == first) & jnp.all(q_doc_BT == first)


def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0):
  """Causal attention on cuDNN; rows with several documents fall back to `chunked`.

  q [B,T,H,D], k/v [B,T,K,D] (H a multiple of K) in bf16/fp16. Returns [B,T,H,D].
  """
  reason = supports(q_BTHD, k_BSKD, bias, q_offset)
  if reason:
    raise ValueError(f"attention.impl='cudnn': {reason}; use attention.impl=auto")
  scale = 1.0 / math.sqrt(q_BTHD.shape[-1])
  fused = functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=scale,
                            implementation="cudnn")
  masked = functools.partial(chunked.attention, q_doc_BT=q_doc_BT, k_doc_BS=k_doc_BS)
  return lax.cond(single_document_rows(q_doc_BT, k_doc_BS), fused, masked,
                  q_BTHD, k_BSKD, v_BSKD)
