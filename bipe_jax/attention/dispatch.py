"""Picks an attention implementation from `attention.impl`, the backend and the bias type.

  reference  dense XLA, [B, H, T, S] scores; the test oracle
  chunked    blockwise online softmax in plain JAX, any backend, any bias object
  pallas     fused kernels (Triton on GPU, Mosaic on TPU), no bias or ALiBi `Bias`
  cudnn      cuDNN flash attention, GPU, half precision, no bias
  auto       the best valid one for the backend, bias type and dtype: GPU cudnn (no
             bias, half precision) else pallas; TPU pallas; FIRE-like biases and
             CPU chunked (on a 2-core CPU, forward+backward 0.80x the reference's
             time at 128 tokens and 0.15x at 4096; slower only at a few dozen
             tokens; see BENCHMARKS.md)

`get(impl)` returns a kernel that resolves when traced, from the actual
arguments (bias object, dtype), logs what `auto` chose, and runs under
shard_map when a mesh is active. `check(impl, kind)` rejects impossible
combinations at config-validation time.
"""
from __future__ import annotations

import functools
import importlib
import logging

import jax
import jax.numpy as jnp

from bipe_jax.attention import shard
from bipe_jax.attention.bias import Bias

IMPLS = ("auto", "reference", "chunked", "pallas", "cudnn")
_HALF = (jnp.bfloat16, jnp.float16)
_log = logging.getLogger(__name__)
_logged: set = set()


def bias_kind(bias) -> str:
  """"none", "alibi" (the in-kernel `Bias`: slopes + positions) or "other" (e.g. FIRE)."""
  if bias is None:
    return "none"
  return "alibi" if isinstance(bias, Bias) else "other"


def _backend(backend: str | None) -> str:
  backend = backend or jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def valid_impls(backend: str | None = None, kind: str = "none", dtype=None) -> tuple:
  """Concrete implementations that can run `kind` of bias on `backend`."""
  backend = _backend(backend)
  names = ["reference", "chunked"]
  if backend in ("gpu", "tpu") and kind in ("none", "alibi"):
    names.append("pallas")
  if backend == "gpu" and kind == "none" and (dtype is None or jnp.dtype(dtype) in _HALF):
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
            kind: str | None = None, encoding: str | None = None) -> str:
  """The concrete implementation `impl` stands for, given the call's bias and dtype.

  `kind` ("none" | "alibi" | "other") overrides the kind read from `bias`.
  """
  _check_name(impl)
  kind = kind or bias_kind(bias)
  backend = _backend(backend)
  valid = valid_impls(backend, kind, dtype)
  if impl != "auto":
    if impl not in valid:
      raise ValueError(
          f"attention.impl={impl!r} cannot run {_describe(kind, encoding)} on backend "
          f"{backend!r} with dtype {jnp.dtype(dtype).name if dtype else 'any'}; "
          f"valid choices: auto, {', '.join(valid)}")
    return impl
  if "cudnn" in valid:
    return "cudnn"
  if "pallas" in valid:
    return "pallas"
  return "chunked"


def kernel_fn(name: str, backend: str | None = None):
  """The function implementing concrete `name` on `backend`."""
  backend = _backend(backend)
  module = {"reference": "reference", "chunked": "chunked", "cudnn": "cudnn",
            "pallas": "pallas_gpu" if backend == "gpu" else "pallas_tpu"}[name]
  return importlib.import_module(f"bipe_jax.attention.{module}").attention


def get(impl: str, mesh=None, batch_axes=None, **block_sizes):
  """attention(q, k, v, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0) for `impl`.

  Resolution happens when the returned function is traced (it sees the bias
  type and the dtype); with an active mesh of several devices
  the kernel runs under shard_map (see attention.shard). `block_sizes`
  (block_q=, block_k=) reach the blockwise kernels (chunked, pallas); None or
  0 keeps a kernel's default.
  """
  check(impl)
  blocks = {k: v for k, v in block_sizes.items() if v}
  unknown = set(blocks) - {"block_q", "block_k"}
  if unknown:
    raise TypeError(f"unknown block size arguments {sorted(unknown)}; valid: block_q, block_k")

  def attention(q_BTHD, k_BSKD, v_BSKD, *, q_doc_BT, k_doc_BS, bias=None, q_offset=0):
    backend = _backend(None)
    name = resolve(impl, bias, backend, q_BTHD.dtype)
    key = (impl, name, backend, bias_kind(bias), k_BSKD.shape[1], jnp.dtype(q_BTHD.dtype).name)
    if key not in _logged:
      _logged.add(key)
      _log.info("attention.impl=%s -> %s (backend %s, bias %s, %d keys, %s)", *key)
    fn = kernel_fn(name, backend)
    if blocks and name in ("chunked", "pallas"):
      fn = functools.partial(fn, **blocks)
    kernel = shard.sharded(fn, mesh, batch_axes)
    return kernel(q_BTHD, k_BSKD, v_BSKD, q_doc_BT=q_doc_BT, k_doc_BS=k_doc_BS,
                  bias=bias, q_offset=q_offset)

  return attention
