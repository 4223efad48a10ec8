"""Typed parameters, one small frozen class per encoding family.

These classes are the one home of every `pe.*` default and check: field names
equal the `pe.*` config keys (and `ModelConfig` fields) they come from, so
`from_fields(obj)` builds one from any object carrying those names, and the
base config and `ModelConfig` take their `pe.*` defaults from here
(`registry.PE_DEFAULTS`). Each class validates itself on construction, naming
the key at fault. A field read from another config key says so in its
metadata (`key`); it is then not a `pe.*` key.
"""
from __future__ import annotations

import dataclasses
from typing import Any


class ParamError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Params:
  """Base: no parameters (NoPE)."""

  @classmethod
  def from_fields(cls, obj: Any) -> "Params":
    """Reads each field of `cls` as an attribute of `obj` (a ModelConfig)."""
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

  def with_defaults(self, encoding) -> "Params":
    """Resolves kind-dependent defaults (e.g. the ALiBi slope multiplier)."""
    del encoding
    return self

  @classmethod
  def pe_defaults(cls) -> dict:
    """{pe.* key: default} of this class's fields (those read from `pe`)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if "key" not in f.metadata}


def _positive(name: str, value) -> None:
  if not value > 0:
    raise ParamError(f"pe.{name}={value!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class LearnedParams(Params):
  """Learned absolute table over flat positions; ids clip to max_positions - 1."""
  max_positions: int = dataclasses.field(default=1024, metadata={"key": "data.seq_len"})

  def __post_init__(self):
    if not self.max_positions > 0:
      raise ParamError(f"data.seq_len={self.max_positions!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class SinusoidalParams(Params):
  """Fixed sin/cos of the flat position (Vaswani et al. 2017), any length."""


@dataclasses.dataclass(frozen=True)
class RopeParams(Params):
  """Frequency i of D/2 turns by base^(-2i/D) per position."""
  rope_base: float = 10000.0

  def __post_init__(self):
    _positive("rope_base", self.rope_base)


@dataclasses.dataclass(frozen=True)
class XposParams(RopeParams):
  """RoPE plus the per-frequency exponential decay zeta^((i-j)/xpos_scale_base)."""
  xpos_scale_base: float = 512.0      # the score decays by zeta^(distance / this)

  def __post_init__(self):
    super().__post_init__()
    _positive("xpos_scale_base", self.xpos_scale_base)


@dataclasses.dataclass(frozen=True)
class RandomizedRopeParams(RopeParams):
  """RoPE on a sorted random subset of [0, max_random_position) while training;
  must be >= data.seq_len (checked by the encoding against the model config)."""
  max_random_position: int = 8192

  def __post_init__(self):
    super().__post_init__()
    _positive("max_random_position", self.max_random_position)


@dataclasses.dataclass(frozen=True)
class AlibiParams(Params):
  """Slope multiplier; 0 means the kind's default (1 for alibi, 96 for BiPE)."""
  alibi_multiplier: float = 0.0

  def __post_init__(self):
    if self.alibi_multiplier < 0:
      raise ParamError(f"pe.alibi_multiplier={self.alibi_multiplier!r} must be "
                       ">= 0 (0 = the kind's default)")

  def with_defaults(self, encoding) -> "AlibiParams":
    if self.alibi_multiplier == 0:
      return dataclasses.replace(self, alibi_multiplier=encoding.default_alibi_multiplier)
    return self


@dataclasses.dataclass(frozen=True)
class FireParams(Params):
  """FIRE MLP width and the initial values of its learned scalars c and L."""
  fire_hidden: int = 32               # width of the MLP
  fire_init_c: float = 0.1            # initial c of psi(x) = log(|c x| + 1)
  fire_init_threshold: float = 512.0  # initial threshold L of the normaliser psi(max(i, L))

  def __post_init__(self):
    _positive("fire_hidden", self.fire_hidden)
    _positive("fire_init_c", self.fire_init_c)
    _positive("fire_init_threshold", self.fire_init_threshold)


INTRA_CHOICES = ("learned", "sinusoidal")


@dataclasses.dataclass(frozen=True)
class IntraParams(Params):
  """The intra-segment input table of bilevel kinds (BIPE_METHOD section 2).

  release_padding_row: reproduce the release's table built with padding index
    -1: its last row (where clipped ids land) is zero and never trained.
  """
  max_intra: int = 1024               # table size; ids clip to max_intra - 1
  intra: str = "learned"              # learned | sinusoidal
  release_padding_row: bool = False

  def __post_init__(self):
    _positive("max_intra", self.max_intra)
    if self.intra not in INTRA_CHOICES:
      raise ParamError(f"invalid pe.intra={self.intra!r}; valid: {', '.join(INTRA_CHOICES)}")
    if self.release_padding_row and self.intra != "learned":
      raise ParamError("pe.release_padding_row=True needs pe.intra='learned' "
                       f"(got {self.intra!r})")
