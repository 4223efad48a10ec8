"""Attention kernels taking per-token positions and document ids."""
from bipe_jax.attention.bias import Bias
from bipe_jax.attention.dispatch import IMPLS, get, resolve

__all__ = ["Bias", "IMPLS", "get", "resolve"]
