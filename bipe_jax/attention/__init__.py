"""Attention kernels taking per-token positions and document ids.

Every kernel has the signature
  fn(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0) -> out_BTHD
(causal, document-masked, grouped kv heads, scale 1/sqrt(D), float32
softmax, output in q's dtype); `bias` is a `PositionBias` (see bias).
`get(impl)` picks one (see dispatch).
"""
from bipe_jax.attention import dispatch
from bipe_jax.attention.bias import Bias, PositionBias
from bipe_jax.attention.dispatch import IMPLS, check, get, resolve
from bipe_jax.attention.shard import sharded

__all__ = ["Bias", "IMPLS", "PositionBias", "check", "dispatch", "get", "resolve", "sharded"]
