"""What one kind contributes, as objects the model asks to act.

An encoding (`registry.Encoding`) has up to two parts:
  * an `InputTerm`, added to the token embedding: a table over flat positions
    (learned, sinusoidal) or, for bilevel kinds, over intra-segment ids;
  * a `Relative` part, acting inside each attention layer on per-token
    positions (flat, or the segment index for bilevel kinds): it may rotate
    q/k and may add a bias (a `bipe_jax.attention.PositionBias`).
Each part's subclass lives in its kind's module with its typed parameters.
"""
from __future__ import annotations

import dataclasses

from bipe_jax.encodings import params as P


@dataclasses.dataclass(frozen=True)
class InputTerm:
  """Absolute term added to the token embedding.

  embed(module, batch, p) -> [B, L, D] float32, called inside the Linen module
  `module` (encodings.InputEmbedding: it has `d_model`, `init_std`,
  `param_dtype` and owns any table); `p` is an instance of `params_cls`.
  """
  params_cls = P.Params

  def embed(self, module, batch, p):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Relative:
  """Relative part: acts on q/k and adds a bias, from per-token positions.

  params_cls: its typed parameters. rotary: it rotates pairs of head dims (the
  head dim must be even). randomized: `positions` draws random positions while
  training (the model then passes an rng). bias_kind: what the attention
  kernels see of its bias ("none" | "alibi" | "other", PositionBias.kernel_kind).
  The default methods do nothing; a kind overrides what it uses.
  """
  params_cls = P.Params
  rotary = False
  randomized = False
  bias_kind = "none"

  def positions(self, p, pos_BL, train: bool, key):
    """[B, L] int32 positions rotary/bias read, from the batch's positions."""
    del p, train, key
    return pos_BL

  def rotate(self, p, q_BLHD, k_BLKD, pos_BL):
    """q [B, L, H, D], k [B, L, K, D] transformed by position."""
    del p, pos_BL
    return q_BLHD, k_BLKD

  def rotate_span(self, p, q_BLHD, k_BLKD, pos_BL, span: int):
    """`rotate` for L tokens that are a piece of a sequence of `span` tokens
    (cached decoding): the result must not depend on L. Override when
    `rotate` reads L (xPos centres its scale on it)."""
    del span
    return self.rotate(p, q_BLHD, k_BLKD, pos_BL)

  def bias(self, p, pos_BL, n_heads: int, param_dtype: str):
    """A PositionBias, or None. Runs inside the attention layer's Linen module,
    so it may create submodules that own parameters."""
    del p, pos_BL, n_heads, param_dtype
    return None

  def check(self, p, cfg) -> None:
    """Raises ValueError for a parameter that does not fit the rest of `cfg`
    (a ModelConfig), naming the keys."""
    del p, cfg
