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


def lookup(module, ids_BL, size: int, padding_row: bool, name: str = "table",
           zero_init: bool = False):
  """Rows of `module`'s learned table `name` [size, D] (normal(init_std), or
  zeros with `zero_init`); ids clip to the last row. With `padding_row` that
  row is zero and gets no gradient."""
  init = nn.initializers.zeros if zero_init else nn.initializers.normal(module.init_std)
  if padding_row:
    base_init = init
    init = lambda key, shape, dtype: base_init(key, shape, dtype).at[-1].set(0)
  table = module.param(name, nn.with_logical_partitioning(init, ("positions", "embed")),
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
  """The inner-level input tables of bilevel kinds (BIPE_METHOD section 2).

  levels: how many levels of position ids (bipe_jax.positions.level_ids);
    2 is BiPE (intra, inter). With K > 2 every inner level gets a table of
    its own, all summed into the embedding, and the relative kind reads the
    outermost id (`inter`); the ids of levels 1..K-2 come as batch["levels"].
  max_level_ids: table sizes of levels 1..K-2 (() = pe.max_intra each); their
    ids clip to size - 1.
  release_padding_row: reproduce the release's table built with padding index
    -1: its last row (where clipped ids land) is zero and never trained.
  """
  max_intra: int = 1024               # table size; ids clip to max_intra - 1
  intra: str = "learned"              # learned | sinusoidal
  release_padding_row: bool = False
  levels: int = 2
  max_level_ids: tuple = ()

  def __post_init__(self):
    P.positive("max_intra", self.max_intra)
    if self.intra not in INTRA_CHOICES:
      raise P.ParamError(f"invalid pe.intra={self.intra!r}; valid: {', '.join(INTRA_CHOICES)}")
    if self.release_padding_row and self.intra != "learned":
      raise P.ParamError("pe.release_padding_row=True needs pe.intra='learned' "
                         f"(got {self.intra!r})")
    if not isinstance(self.levels, int) or self.levels < 2:
      raise P.ParamError(f"pe.levels={self.levels!r} must be an integer >= 2 "
                         "(2: BiPE's intra and inter)")
    sizes = tuple(self.max_level_ids)
    if sizes and (len(sizes) != self.levels - 2 or
                  not all(isinstance(m, int) and m > 0 for m in sizes)):
      raise P.ParamError(f"pe.max_level_ids={sizes} must be empty (pe.max_intra each) or "
                         f"{self.levels - 2} positive integers, one per level between "
                         f"intra and inter (pe.levels={self.levels})")
    object.__setattr__(self, "max_level_ids", sizes)

  @property
  def inner_sizes(self) -> tuple[int, ...]:
    """Table size of every inner level, finest (intra) first: K-1 ints."""
    return (self.max_intra,) + (self.max_level_ids or (self.max_intra,) * (self.levels - 2))


@dataclasses.dataclass(frozen=True)
class Intra(InputTerm):
  """Tables over `intra` and the ids of batch["levels"] (levels 1..K-2),
  summed; learned or sinusoidal per pe.intra. The intra table is named
  "table" (as in two-level checkpoints) and starts normal(init_std), level j's
  "level_<j>" starts at zero: a few of its rows are shared by most tokens
  (the first line of every block), and random rows there add one common
  vector to most token embeddings, which slowed early training in
  RESULTS.md's probe; from zero, K levels start as exactly two."""
  params_cls = IntraParams

  def embed(self, module, batch, p):
    ids = [batch["intra"]] + [batch["levels"][:, j] for j in range(p.levels - 2)]
    terms = [sinusoidal(ids_BL, module.d_model) if p.intra == "sinusoidal" else
             lookup(module, ids_BL, size, p.release_padding_row and j == 0,
                    "table" if j == 0 else f"level_{j}", zero_init=j > 0)
             for j, (ids_BL, size) in enumerate(zip(ids, p.inner_sizes))]
    out_BLD = terms[0]
    for term_BLD in terms[1:]:
      out_BLD = out_BLD + term_BLD
    return out_BLD
