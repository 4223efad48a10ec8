"""Picks an attention implementation from `attention.impl`, the backend and the bias type.

  reference  dense XLA, [B, H, T, S] scores; the test oracle
  dense      dense with saved probabilities and causal row blocks, any backend and bias;
             memory quadratic in length (for short sequences)
  chunked    blockwise online softmax in plain JAX, any backend, any bias object
  pallas     fused kernels (Triton on GPU, Mosaic on TPU), no bias or ALiBi `Bias`
  cudnn      cuDNN flash attention, GPU, half precision, no bias, self-attention only
  auto       the best valid one for the backend, bias type, dtype and shapes: GPU cudnn
             (no bias, half precision) else pallas; TPU pallas; FIRE-like biases and
             CPU: dense while the keys are at most DENSE_MAX_KEYS and one layer's
             probabilities at most DENSE_MAX_SCORES values, else chunked (on a
             2-core CPU, see BENCHMARKS.md)

`get(impl)` returns a kernel that resolves when traced, from the actual
arguments (bias object, dtype, self-attention or not), logs what `auto`
chose, and runs under shard_map when a mesh is active. `check(impl, kind)`
rejects impossible combinations at config-validation time.
"""
from __future__ import annotations

import functools
import importlib
import logging

import jax
import jax.numpy as jnp

from bipe_jax.attention import shard

IMPLS = ("auto", "reference", "dense", "chunked", "pallas", "cudnn")
# `auto` takes `dense` on CPU up to these sizes: its saved probabilities cost
# B*H*T*S*4 bytes per layer (48 MiB for 12 heads at 1024 tokens).
DENSE_MAX_KEYS = 2048
DENSE_MAX_SCORES = 2**26
_HALF = (jnp.bfloat16, jnp.float16)
_log = logging.getLogger(__name__)
_logged: set = set()


def bias_kind(bias) -> str:
  """"none", "alibi" (the in-kernel `Bias`: slopes + positions) or "other" (e.g. FIRE)."""
  return "none" if bias is None else bias.kernel_kind


def _backend(backend: str | None) -> str:
  backend = backend or jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def valid_impls(backend: str | None = None, kind: str = "none", dtype=None,
                self_attention: bool = True) -> tuple:
  """Concrete implementations that can run `kind` of bias on `backend`.

  self_attention=False: queries attend to other keys (T != S or a q_offset,
  e.g. decoding against a cache), which cuDNN's path does not run.
  """
  backend = _backend(backend)
  names = ["reference", "dense", "chunked"]
  if backend in ("gpu", "tpu") and kind in ("none", "alibi"):
    names.append("pallas")
  if (backend == "gpu" and kind == "none" and self_attention
      and (dtype is None or jnp.dtype(dtype) in _HALF)):
    names.append("cudnn")
  return tuple(names)


def _describe(kind: str, encoding: str | None) -> str:
  return f"encoding {encoding!r} (bias: {kind})" if encoding else f"bias: {kind}"


def _check_name(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"unknown attention.impl {impl!r}; valid: {', '.join(IMPLS)}")


def check(impl: str, kind: str | None = None, backend: str | None = None, *,
          encoding: str | None = None) -> None:
  """Raises ValueError unless `impl` is known and can run biases of `kind` on `backend`.

  Without `kind` only the name and the backend are checked; `encoding` (a
  pe.kind) only names the culprit in the message. An encoding checks itself
  with `encodings.get(pe_kind).check_attention(impl, backend)`.
  """
  _check_name(impl)
  if impl == "auto":
    return
  kinds = [kind] if kind else ["none", "alibi", "other"]
  backend = _backend(backend)
  if not any(impl in valid_impls(backend, k) for k in kinds):
    valid = valid_impls(backend, kinds[0])
    what = f"cannot run {_describe(kinds[0], encoding)} on" if kind else "is not available on"
    raise ValueError(f"attention.impl={impl!r} {what} backend {backend!r}; "
                     f"valid choices: auto, {', '.join(valid)}")


def resolve(impl: str, bias=None, backend: str | None = None, dtype=None, *,
            kind: str | None = None, encoding: str | None = None,
            self_attention: bool = True, scores: tuple | None = None) -> str:
  """The concrete implementation `impl` stands for, given the call's bias and dtype.

  `kind` ("none" | "alibi" | "other") overrides the kind read from `bias`.
  `scores`: the (B, H, T, S) shape of the call's score matrix; without it
  `auto` never picks `dense`.
  """
  _check_name(impl)
  kind = kind or bias_kind(bias)
  backend = _backend(backend)
  valid = valid_impls(backend, kind, dtype, self_attention)
  if impl != "auto":
    if impl not in valid:
      what = "" if self_attention else " attending to other keys (T != S or a q_offset)"
      raise ValueError(
          f"attention.impl={impl!r} cannot run {_describe(kind, encoding)}{what} on backend "
          f"{backend!r} with dtype {jnp.dtype(dtype).name if dtype else 'any'}; "
          f"valid choices: auto, {', '.join(valid)}")
    return impl
  if "cudnn" in valid:
    return "cudnn"
  if "pallas" in valid:
    return "pallas"
  if backend == "cpu" and scores and _dense_fits(*scores):
    return "dense"
  return "chunked"


def _dense_fits(b: int, h: int, t: int, s: int) -> bool:
  return s <= DENSE_MAX_KEYS and b * h * t * s <= DENSE_MAX_SCORES


def kernel_fn(name: str, backend: str | None = None):
  """The function implementing concrete `name` on `backend`."""
  backend = _backend(backend)
  module = {"reference": "reference", "dense": "dense", "chunked": "chunked", "cudnn": "cudnn",
            "pallas": "pallas_gpu" if backend == "gpu" else "pallas_tpu"}[name]
  return importlib.import_module(f"bipe_jax.attention.{module}").attention


def get(impl: str, mesh=None, batch_axes=None, **block_sizes):
  """attention(q, k, v, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0) for `impl`.

  Resolution happens when the returned function is traced (it sees the bias
  type, the dtype and whether queries and keys are the same tokens); with an active mesh of several devices
  the kernel runs under shard_map (see attention.shard). `block_sizes`
  (block_q=, block_k=) reach the blockwise kernels (chunked, pallas), block_q
  also `dense` (its row block); None or 0 keeps a kernel's default.
  """
  check(impl)
  blocks = {k: v for k, v in block_sizes.items() if v}
  unknown = set(blocks) - {"block_q", "block_k"}
  if unknown:
    raise TypeError(f"unknown block size arguments {sorted(unknown)}; valid: block_q, block_k")

  def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0):
    backend = _backend(None)
    self_attention = (q_BTHD.shape[1] == k_BSKD.shape[1]
                      and isinstance(q_offset, int) and q_offset == 0)
    name = resolve(impl, bias, backend, q_BTHD.dtype, self_attention=self_attention,
                   scores=(*q_BTHD.shape[:3], k_BSKD.shape[1]))
    key = (impl, name, backend, bias_kind(bias), k_BSKD.shape[1], jnp.dtype(q_BTHD.dtype).name)
    if key not in _logged:
      _logged.add(key)
      _log.info("attention.impl=%s -> %s (backend %s, bias %s, %d keys, %s)", *key)
    fn = kernel_fn(name, backend)
    if blocks and name in ("chunked", "pallas"):
      fn = functools.partial(fn, **blocks)
    elif blocks.get("block_q") and name == "dense":
      fn = functools.partial(fn, row_block=blocks["block_q"])
    kernel = shard.sharded(fn, mesh, batch_axes)
    return kernel(q_BTHD, k_BSKD, v_BSKD, q_doc_BT=q_doc_BT, k_doc_BS=k_doc_BS,
                  bias=bias, q_offset=q_offset)

  return attention
