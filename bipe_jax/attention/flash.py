"""Glue shared by the Pallas kernels: argument checks, padding, the custom VJP.

The Pallas kernels take the ALiBi-family `Bias` only (per-head slopes and
per-token positions, evaluated in registers); other bias objects (FIRE) go to
`chunked`. Slopes and positions are treated as constants: differentiating
them through a Pallas kernel raises (use `chunked` for learned slopes).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bipe_jax.attention import tiling
from bipe_jax.attention.bias import Bias


class Padded(NamedTuple):
  """Kernel operands padded to whole blocks (T -> Tp, S -> Sp).

  q [B,Tp,H,D], k/v [B,Sp,K,D]; q_doc [B,Tp] / k_doc [B,Sp] int32 (padding
  never matches); q_pos [B,Tp] / k_pos [B,Sp] float32 and slopes [H] float32,
  or None without bias; off: int32 scalar q_offset.
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_doc: jax.Array
  k_doc: jax.Array
  q_pos: jax.Array | None
  k_pos: jax.Array | None
  slopes: jax.Array | None
  off: jax.Array


def prepare(name: str, q_BTHD, k_BSKD, v_BSKD, q_doc_BT, k_doc_BS, bias, q_offset,
            bq: int, bk: int) -> Padded:
  """Checks the arguments of Pallas kernel `name` and pads them to blocks bq / bk."""
  h, kv = q_BTHD.shape[2], k_BSKD.shape[2]
  if h % kv:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kv}")
  if bias is not None and not isinstance(bias, Bias):
    raise ValueError(f"{name} computes only the ALiBi-family Bias in-kernel, got "
                     f"{type(bias).__name__}; use attention.impl=chunked (or auto) for it")
  tp = tiling.round_up(q_BTHD.shape[1], bq)
  sp = tiling.round_up(k_BSKD.shape[1], bk)
  f32 = lambda x: x.astype(jnp.float32)
  return Padded(
      q=tiling.pad_to(q_BTHD, 1, tp), k=tiling.pad_to(k_BSKD, 1, sp), v=tiling.pad_to(v_BSKD, 1, sp),
      q_doc=tiling.pad_to(q_doc_BT.astype(jnp.int32), 1, tp, tiling.PAD_Q_DOC),
      k_doc=tiling.pad_to(k_doc_BS.astype(jnp.int32), 1, sp, tiling.PAD_K_DOC),
      q_pos=None if bias is None else tiling.pad_to(f32(bias.q_pos_BT), 1, tp),
      k_pos=None if bias is None else tiling.pad_to(f32(bias.k_pos_BS), 1, sp),
      slopes=None if bias is None else f32(bias.slopes_H),
      off=tiling.q_offset_array(q_offset))


def visible(i, j, off, bq: int, bk: int):
  """Whether query block i sees any key of key block j under the causal mask."""
  return j * bk <= i * bq + bq - 1 + off


def last_k_block(i, off, bq: int, bk: int, nk: int):
  """Index of the last key block query block i sees (clamped to the grid)."""
  # lax.div truncates (no sign op, which Mosaic lowers per TPU generation);
  # equal to floor division here since the numerator is >= 0.
  return jnp.clip(lax.div(i * bq + bq - 1 + off, bk), 0, nk - 1)


def first_q_block(j, off, bq: int, bk: int, nq: int):
  """Index of the first query block that sees key block j (clamped to the grid)."""
  # Truncation rounds a negative numerator up, to <= 0: clipped to 0 either way.
  return jnp.clip(lax.div(j * bk - off, bq), 0, nq - 1)


def make_vjp(forward, backward, name: str):
  """custom_vjp of `forward(static, q, k, v, qd, kd, qp, kp, slopes, off) -> (out, lse)`.

  `backward(static, q, k, v, qd, kd, qp, kp, slopes, off, out, lse, do)`
  returns (dq, dk, dv); ids, positions, slopes and the offset get no gradient.
  """
  fn = jax.custom_vjp(lambda static, *args: forward(static, *args)[0], nondiff_argnums=(0,))

  def fwd(static, *args):
    for label, x in zip(("positions", "positions", "slopes"), args[5:8]):
      if x is not None and x.perturbed:
        raise NotImplementedError(f"{name} does not differentiate ALiBi {label}; "
                                  "use attention.impl=chunked to learn them")
    vals = jax.tree.map(lambda x: x.value, args)
    out, lse = forward(static, *vals)
    return out, (*vals, out, lse)

  def bwd(static, res, do):
    do = tiling.value_or_zeros(do, res[-2])
    dq, dk, dv = backward(static, *res, do)
    return dq, dk, dv, None, None, None, None, None, None

  fn.defvjp(fwd, bwd, symbolic_zeros=True)
  return fn
