"""Windowed reductions, the global norm and clipping against numpy and optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bipe_jax import windowed
from bipe_jax.global_norm import clip_by_global_norm, global_norm, sum_of_squares

SHAPES = [(), (1,), (7,), (8,), (9,), (64,), (3, 1000), (5, 9, 13), (1000, 3), (4097,)]


def _tree(seed: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return {f"x{i}": jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
          for i, s in enumerate(SHAPES)}


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000, 1024])
def test_reduce_last_axis_matches_numpy(n):
  x = np.random.default_rng(n).standard_normal((3, 2, n)).astype(np.float32)
  x[0, 1, -1] = 50.0     # the max sits in the last (padded) window
  for op, ref in ((jnp.sum, np.sum), (jnp.max, np.max)):
    for keepdims in (False, True):
      got = jax.jit(lambda y: windowed.reduce_last_axis(y, op, keepdims=keepdims))(x)
      want = ref(x.astype(np.float64), axis=-1, keepdims=keepdims)
      assert got.shape == want.shape
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)


def test_reduce_last_axis_all_negative_rows_and_bad_op():
  x = -np.arange(1, 21, dtype=np.float32).reshape(2, 10) - 1e30
  np.testing.assert_array_equal(np.asarray(windowed.reduce_last_axis(x, jnp.max)), x.max(-1))
  with pytest.raises(ValueError, match="jnp.sum or jnp.max"):
    windowed.reduce_last_axis(x, jnp.mean)


@pytest.mark.parametrize("shape", SHAPES)
def test_sum_of_squares_matches_float64(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  want = np.sum(x.astype(np.float64) ** 2)
  got = jax.jit(sum_of_squares)(x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_sum_of_squares_bfloat16_accumulates_in_float32():
  x = jnp.full((4096,), 3.0, jnp.bfloat16)   # 36864: not representable in bfloat16
  assert float(jax.jit(sum_of_squares)(x)) == 36864.0


def test_global_norm_matches_numpy_and_optax():
  tree = _tree(1)
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  got = float(jax.jit(global_norm)(tree))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, float(optax.tree.norm(tree)), rtol=1e-6)
  assert float(global_norm({})) == 0.0


def test_global_norm_propagates_non_finite():
  tree = _tree(2)
  tree["x6"] = tree["x6"].at[1, 999].set(jnp.nan)
  assert np.isnan(float(jax.jit(global_norm)(tree)))
  tree["x6"] = tree["x6"].at[1, 999].set(jnp.inf)
  assert np.isinf(float(jax.jit(global_norm)(tree)))


@pytest.mark.parametrize("scale", [1e-3, 10.0])   # norm below / above the threshold
def test_clip_equals_optax(scale):
  grads = _tree(3, scale)
  ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  params = _tree(4)
  assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))
  got, _ = jax.jit(ours.update)(grads, ours.init(params))
  want, _ = theirs.update(grads, theirs.init(params))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=1e-12)
  norm = float(optax.tree.norm(got))
  assert norm <= 1.0 + 1e-5 if scale > 1 else norm == pytest.approx(float(optax.tree.norm(grads)))
