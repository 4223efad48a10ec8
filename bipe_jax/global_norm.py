"""Global norm and gradient clipping of parameter trees, at memory speed on XLA:CPU.

A training step takes two global norms (the gradient's for clipping, the
parameters' for the finiteness check). optax's sums squares in one long
reduction per leaf, which XLA:CPU runs at about 2.5 GB/s (see
bipe_jax/windowed.py): 0.26-0.28 s per norm of the 151M model on a 2-core
x86 CPU. Here each leaf is summed with `windowed.reduce_last_axis`: 20 ms
for the same tree (`python benchmarks/global_norm.py`). On other backends
that is one plain reduction per leaf, optax's arithmetic.

`clip_by_global_norm` is optax's transform with this norm: same arithmetic,
same (empty) state, so checkpoints are unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bipe_jax import windowed


def sum_of_squares(x: jax.Array) -> jax.Array:
  """sum(x**2) in float32, reduced in windows along the last axis (bipe_jax.windowed)."""
  y = jnp.square(jnp.asarray(x, jnp.float32))
  if y.ndim == 0:
    return y
  return jnp.sum(windowed.reduce_last_axis(y))


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves together, as optax.tree.norm computes it."""
  return jnp.sqrt(sum((sum_of_squares(x) for x in jax.tree.leaves(tree)), jnp.float32(0)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm with `global_norm`: updates scaled to norm <= max_norm."""

  def update(updates, state, params=None):
    del params
    g_norm = global_norm(updates)
    keep = g_norm < max_norm
    updates = jax.tree.map(
        lambda t: jax.lax.select(keep, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update)
