"""Picks an attention implementation from `attention.impl`."""
from __future__ import annotations

from bipe_jax.attention import reference

IMPLS = ("auto", "reference")


def check(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"unknown attention.impl {impl!r}; valid: {', '.join(IMPLS)}")


def resolve(impl: str) -> str:
  """The concrete implementation `impl` stands for on this backend."""
  check(impl)
  return "reference" if impl == "auto" else impl


def get(impl: str):
  """Returns attention(q, k, v, *, q_doc_BT, k_doc_BS, bias, q_offset)."""
  name = resolve(impl)
  return {"reference": reference.attention}[name]
