"""Fixed sinusoidal encodings (Vaswani et al. 2017)."""
import jax.numpy as jnp
import numpy as np


def sinusoidal_table(n_positions: int, d_model: int) -> np.ndarray:
  """[n_positions, d_model] float32: sin on even columns, cos on odd columns."""
  pos = np.arange(n_positions, dtype=np.float64)[:, None]
  i = np.arange(0, d_model, 2, dtype=np.float64)
  angle = pos / (10000.0 ** (i / d_model))
  table = np.zeros((n_positions, d_model), dtype=np.float64)
  table[:, 0::2] = np.sin(angle)
  table[:, 1::2] = np.cos(angle)[:, : d_model // 2]
  return table.astype(np.float32)


def sinusoidal(pos_BL, d_model: int):
  """[B, L, d_model] float32, row p of `sinusoidal_table` for any position p."""
  i_F = jnp.arange(0, d_model, 2, dtype=jnp.float32)
  angle_BLF = pos_BL.astype(jnp.float32)[..., None] / (10000.0 ** (i_F / d_model))
  pairs = jnp.stack([jnp.sin(angle_BLF), jnp.cos(angle_BLF)], axis=-1)
  return pairs.reshape(*pos_BL.shape, -1)[..., :d_model]
