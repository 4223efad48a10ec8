"""ALiBi (Press et al. 2022): slopes as in BIPE_METHOD section 2, and its bias."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from bipe_jax.attention.bias import Bias
from bipe_jax.encodings import params as P
from bipe_jax.encodings.kind import Relative

# The release multiplies bilevel ALiBi slopes by 96: segment distances are an
# order of magnitude smaller than token distances.
BILEVEL_MULTIPLIER = 96.0


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
  # Multiply before rounding to float32, as the release does.
  return (np.asarray(slopes, dtype=np.float64) * multiplier).astype(np.float32)


def alibi_bias(slopes_H, pos_BL, per_key: bool = False):
  """ALiBi as a kernel bias object (bipe_jax.attention.Bias) over positions.

  Full form: score[b,h,i,j] += -m_h (pos[i] - pos[j]). `per_key=True` gives the
  release's form +m_h pos[j], equal after softmax under a causal mask (the
  -m_h pos[i] term is constant along a query row) but less precise in float32
  once m_h pos grows large, so the model uses the full form.
  """
  pos32_BL = pos_BL.astype(jnp.float32)
  q_pos_BL = jnp.zeros_like(pos32_BL) if per_key else pos32_BL
  return Bias(jnp.asarray(slopes_H, jnp.float32), q_pos_BL, pos32_BL)


@dataclasses.dataclass(frozen=True)
class AlibiParams(P.Params):
  """Slope multiplier; 0 means the kind's default (1 for alibi, 96 for BiPE)."""
  alibi_multiplier: float = 0.0

  def __post_init__(self):
    if self.alibi_multiplier < 0:
      raise P.ParamError(f"pe.alibi_multiplier={self.alibi_multiplier!r} must be "
                         ">= 0 (0 = the kind's default)")

  def with_defaults(self, encoding) -> "AlibiParams":
    if self.alibi_multiplier == 0:
      default = BILEVEL_MULTIPLIER if encoding.bilevel else 1.0
      return dataclasses.replace(self, alibi_multiplier=default)
    return self


@dataclasses.dataclass(frozen=True)
class AlibiRelative(Relative):
  params_cls = AlibiParams
  bias_kind = Bias.kernel_kind

  def bias(self, p, pos_BL, n_heads: int, param_dtype: str):
    del param_dtype
    return alibi_bias(alibi_slopes(n_heads, p.alibi_multiplier), pos_BL)
