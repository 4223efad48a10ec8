"""Absolute input terms: learned and sinusoidal tables over flat positions, and
the intra-segment table of bilevel kinds (BIPE_METHOD section 2)."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from bipe_jax.encodings import params as P
from bipe_jax.encodings.kind import InputTerm


def sinusoidal(pos_BL, d_model: int):
  """[B, L, d_model] float32: column 2k is sin(p / 10000^(2k/d)), column 2k+1 its cos."""
  i_F = jnp.arange(0, d_model, 2, dtype=jnp.float32)
  angle_BLF = pos_BL.astype(jnp.float32)[..., None] / (10000.0 ** (i_F / d_model))
  pairs = jnp.stack([jnp.sin(angle_BLF), jnp.cos(angle_BLF)], axis=-1)
  return pairs.reshape(*pos_BL.shape, -1)[..., :d_model]


def lookup(module, ids_BL, size: int, padding_row: bool):
  """Rows of `module`'s learned table "table" [size, D] (normal(init_std)); ids
  clip to the last row. With `padding_row` that row is zero and gets no gradient."""
  init = nn.initializers.normal(module.init_std)
  if padding_row:
    base_init = init
    init = lambda key, shape, dtype: base_init(key, shape, dtype).at[-1].set(0)
  table = module.param("table", nn.with_logical_partitioning(init, ("positions", "embed")),
                       (size, module.d_model), module.param_dtype)
  ids_BL = jnp.clip(ids_BL, 0, size - 1)
  out_BLD = jnp.take(table, ids_BL, axis=0).astype(jnp.float32)
  if padding_row:
    # The release's nn.Embedding(padding_idx=-1): that row reads as zero.
    out_BLD = jnp.where((ids_BL == size - 1)[..., None], 0.0, out_BLD)
  return out_BLD


@dataclasses.dataclass(frozen=True)
class LearnedParams(P.Params):
  """Learned absolute table over flat positions; ids clip to max_positions - 1."""
  max_positions: int = dataclasses.field(default=1024, metadata={"key": "data.seq_len"})

  def __post_init__(self):
    if not self.max_positions > 0:
      raise P.ParamError(f"data.seq_len={self.max_positions!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class Learned(InputTerm):
  """Table [max_positions, D] over the flat position."""
  params_cls = LearnedParams

  def embed(self, module, batch, p):
    return lookup(module, batch["positions"], p.max_positions, False)


@dataclasses.dataclass(frozen=True)
class SinusoidalParams(P.Params):
  """Fixed sin/cos of the flat position (Vaswani et al. 2017), any length."""


@dataclasses.dataclass(frozen=True)
class Sinusoidal(InputTerm):
  params_cls = SinusoidalParams

  def embed(self, module, batch, p):
    del p
    return sinusoidal(batch["positions"], module.d_model)


INTRA_CHOICES = ("learned", "sinusoidal")


@dataclasses.dataclass(frozen=True)
class IntraParams(P.Params):
  """The intra-segment input table of bilevel kinds (BIPE_METHOD section 2).

  release_padding_row: reproduce the release's table built with padding index
    -1: its last row (where clipped ids land) is zero and never trained.
  """
  max_intra: int = 1024               # table size; ids clip to max_intra - 1
  intra: str = "learned"              # learned | sinusoidal
  release_padding_row: bool = False

  def __post_init__(self):
    P.positive("max_intra", self.max_intra)
    if self.intra not in INTRA_CHOICES:
      raise P.ParamError(f"invalid pe.intra={self.intra!r}; valid: {', '.join(INTRA_CHOICES)}")
    if self.release_padding_row and self.intra != "learned":
      raise P.ParamError("pe.release_padding_row=True needs pe.intra='learned' "
                         f"(got {self.intra!r})")


@dataclasses.dataclass(frozen=True)
class Intra(InputTerm):
  """Table over `intra` ids, learned (normal 0.02) or sinusoidal per pe.intra."""
  params_cls = IntraParams

  def embed(self, module, batch, p):
    if p.intra == "sinusoidal":
      return sinusoidal(batch["intra"], module.d_model)
    return lookup(module, batch["intra"], p.max_intra, p.release_padding_row)
