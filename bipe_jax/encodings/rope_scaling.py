"""Context extension for the rotary kinds: position interpolation, NTK-aware scaling, YaRN.

Each changes the rotary frequencies theta_i = base^(-2i/D) (i < D/2) that turn
the position the kind rotates by (`inter` for bipe_* kinds, the token index
otherwise); with scale factor s:
  linear (PI, Chen et al. 2023):  theta_i / s, i.e. positions divided by s;
  ntk (NTK-aware, bloc97 2023; Peng et al. 2023 sec. 3.1): base' = base * s^(D/(D-2));
  yarn (Peng et al. 2023): with wavelength lambda_i = 2 pi / theta_i and
    r_i = L / lambda_i (L: the original length), the ramp
    gamma_i = clip((r_i - alpha) / (beta - alpha), 0, 1) mixes
    theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i (interpolate the
    long wavelengths, keep the short ones), and q and k are both multiplied by
    sqrt(1/t) = 0.1 ln(s) + 1, so the logits carry 1/t.
The ramp is linear in r_i as the paper writes it (HF transformers ramps over
the dimension index between the rounded bounds instead).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from bipe_jax.encodings import params as P

KINDS = ("none", "linear", "ntk", "yarn")


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class RopeScaling(P.Params):
  """`pe.rope_scaling.*`: how rotary frequencies stretch to longer inputs (see module doc)."""
  kind: str = "none"             # none | linear | ntk | yarn
  factor: float = 1.0            # s >= 1: the context is stretched s times
  original_length: int = 0       # yarn's L, in rotated positions; 0 = data.seq_len
  beta_fast: float = 32.0        # yarn's beta: r above it keeps its frequency
  beta_slow: float = 1.0         # yarn's alpha: r below it is interpolated

  def __post_init__(self):
    if self.kind not in KINDS:
      raise P.ParamError(f"invalid pe.rope_scaling.kind={self.kind!r}; valid: {', '.join(KINDS)}")
    if not (_number(self.factor) and self.factor >= 1):
      raise P.ParamError(f"pe.rope_scaling.factor={self.factor!r} must be a number >= 1 "
                         "(how many times longer the context becomes)")
    if not (isinstance(self.original_length, int) and self.original_length >= 0):
      raise P.ParamError(f"pe.rope_scaling.original_length={self.original_length!r} must be "
                         "an integer >= 0 (0 = data.seq_len)")
    if not (_number(self.beta_slow) and _number(self.beta_fast)
            and 0 < self.beta_slow < self.beta_fast):
      raise P.ParamError(f"pe.rope_scaling.beta_slow={self.beta_slow!r} and beta_fast="
                         f"{self.beta_fast!r} must satisfy 0 < beta_slow < beta_fast")

  @property
  def active(self) -> bool:
    return self.kind != "none"

  @property
  def attention_factor(self) -> float:
    """What q and k are multiplied by: sqrt(1/t) = 0.1 ln(s) + 1 for yarn, else 1
    (exactly 1 at s = 1)."""
    return 0.1 * math.log(self.factor) + 1.0 if self.kind == "yarn" else 1.0


def inv_frequencies(head_dim: int, base: float, scaling: RopeScaling = RopeScaling(),
                    train_length: int = 0):
  """[D/2] float32 frequencies theta'_i (radians per position) under `scaling`.

  `train_length` is yarn's L when scaling.original_length is 0 (data.seq_len).
  """
  exponent_F = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  if scaling.factor == 1:  # every schedule is the identity at s = 1: keep it exact
    scaling = RopeScaling()
  if scaling.kind == "ntk":
    base = base * scaling.factor ** (head_dim / (head_dim - 2))
  theta_F = 1.0 / (base ** exponent_F)
  if scaling.kind == "linear":
    return theta_F / scaling.factor
  if scaling.kind == "yarn":
    length = scaling.original_length or train_length
    if length < 1:
      raise ValueError("pe.rope_scaling.kind='yarn' needs the original length: set "
                       "pe.rope_scaling.original_length or data.seq_len")
    r_F = length * theta_F / (2 * math.pi)
    gamma_F = jnp.clip((r_F - scaling.beta_slow) / (scaling.beta_fast - scaling.beta_slow), 0, 1)
    return (1 - gamma_F) * theta_F / scaling.factor + gamma_F * theta_F
  return theta_F
