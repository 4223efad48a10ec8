"""Fixed sinusoidal tables (Vaswani et al. 2017)."""
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
