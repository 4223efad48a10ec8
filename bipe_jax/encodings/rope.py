"""Rotary position embedding in the rotate-half (Llama) layout."""
import jax.numpy as jnp


def apply_rope(x_BLHD, pos_BL, base: float = 10000.0):
  """Rotates x by angle pos * base^(-2i/D); positions may be any integers (inter ids)."""
  d = x_BLHD.shape[-1]
  inv_freq_F = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angle_BLF = pos_BL.astype(jnp.float32)[..., None] * inv_freq_F
  cos_BL1D = jnp.cos(jnp.concatenate([angle_BLF, angle_BLF], -1))[:, :, None, :]
  sin_BL1D = jnp.sin(jnp.concatenate([angle_BLF, angle_BLF], -1))[:, :, None, :]
  x32 = x_BLHD.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * cos_BL1D + rotated * sin_BL1D).astype(x_BLHD.dtype)
