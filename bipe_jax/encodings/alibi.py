"""ALiBi slopes (Press et al. 2022), as in BIPE_METHOD section 2."""
import math

import numpy as np


def _power_of_two_slopes(n: int) -> list[float]:
  start = 2.0 ** (-8.0 / n)
  return [start ** (h + 1) for h in range(n)]


def alibi_slopes(n_heads: int, multiplier: float = 1.0) -> np.ndarray:
  """Per-head slopes [H] float32; non-powers of two follow the ALiBi paper."""
  if n_heads < 1:
    raise ValueError(f"n_heads must be >= 1, got {n_heads}")
  p = 2 ** int(math.floor(math.log2(n_heads)))
  slopes = _power_of_two_slopes(p)
  if p < n_heads:
    slopes += _power_of_two_slopes(2 * p)[0::2][: n_heads - p]
  return np.asarray(slopes, dtype=np.float64).astype(np.float32) * np.float32(multiplier)
