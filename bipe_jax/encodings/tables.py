"""Fixed sinusoidal encodings (Vaswani et al. 2017)."""
import jax.numpy as jnp


def sinusoidal(pos_BL, d_model: int):
  """[B, L, d_model] float32: column 2k is sin(p / 10000^(2k/d)), column 2k+1 its cos."""
  i_F = jnp.arange(0, d_model, 2, dtype=jnp.float32)
  angle_BLF = pos_BL.astype(jnp.float32)[..., None] / (10000.0 ** (i_F / d_model))
  pairs = jnp.stack([jnp.sin(angle_BLF), jnp.cos(angle_BLF)], axis=-1)
  return pairs.reshape(*pos_BL.shape, -1)[..., :d_model]
