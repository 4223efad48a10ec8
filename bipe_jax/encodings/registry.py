"""The table of encodings: `pe.kind` -> what the kind is made of.

Base kinds are written out once, one line each; the bilevel (`bipe_*`) version
of every relative kind is derived from it by `_bilevel`, never written by hand.
"""
from __future__ import annotations

import dataclasses

from bipe_jax import attention
from bipe_jax.encodings import absolute, alibi, fire, randomized, rope, xpos
from bipe_jax.encodings import params as P
from bipe_jax.encodings.kind import InputTerm, Relative


@dataclasses.dataclass(frozen=True)
class Encoding:
  """What one `pe.kind` contributes to the model (see encodings.kind).

  input_term: the absolute term added to the token embedding, or None.
  relative: the part acting in attention (q/k transform, bias), or None.
  bilevel: `relative` reads the segment index `inter` instead of the flat
    position, and `input_term` is the intra-segment table.
  """
  name: str
  short: str
  description: str
  paper: str
  input_term: InputTerm | None = None
  relative: Relative | None = None
  bilevel: bool = False

  @property
  def params_cls(self) -> type:
    """The typed parameter class of this kind's position part."""
    part = self.relative or self.input_term
    return part.params_cls if part else P.Params

  @property
  def rotary(self) -> bool:
    return self.relative is not None and self.relative.rotary

  @property
  def randomized(self) -> bool:
    """Rotary/bias positions are a sorted random subset while training."""
    return self.relative is not None and self.relative.randomized

  @property
  def bias_kind(self) -> str:
    """What attention kernels see of this kind's bias: "none", "alibi" or "other"."""
    return "none" if self.relative is None else self.relative.bias_kind

  def check_attention(self, impl: str, backend: str | None = None) -> None:
    """Raises ValueError unless attention.impl `impl` can run this kind on `backend`."""
    attention.check(impl, self.bias_kind, backend, encoding=self.name)

  def params(self, obj) -> P.Params:
    """Typed parameters of the position part, read from `obj` (a ModelConfig)."""
    return self.params_cls.from_fields(obj).with_defaults(self)

  def intra_params(self, obj) -> absolute.IntraParams | None:
    """Typed parameters of the intra table (bilevel kinds), else None."""
    return absolute.IntraParams.from_fields(obj) if self.bilevel else None

  def check(self, cfg) -> None:
    """Raises ValueError, naming the key, unless `cfg` (a ModelConfig) can run this kind."""
    if self.rotary and cfg.head_dim % 2:
      raise ValueError(f"pe.kind={self.name!r} rotates pairs of dims: head dim "
                       f"{cfg.head_dim} must be even")
    p = self.params(cfg)
    if not self.rotary and cfg.rope_scaling.active:
      raise ValueError(f"pe.rope_scaling.kind={cfg.rope_scaling.kind!r} stretches rotary "
                       f"frequencies, and pe.kind={self.name!r} rotates nothing; use a "
                       "rotary kind (rope, bipe_rope, xpos, ...) or pe.rope_scaling.kind=none")
    # pe.intra, pe.max_intra and pe.levels are checked for every kind.
    levels = absolute.IntraParams.from_fields(cfg).levels
    if levels != 2 and not self.bilevel:
      raise ValueError(
          f"pe.levels={levels} needs a bilevel kind ("
          f"{', '.join(sorted(k for k, e in KINDS.items() if e.bilevel))}): pe.kind="
          f"{self.name!r} reads flat positions; use pe.levels=2 with it")
    if self.relative is not None:
      self.relative.check(p, cfg)


_BASE = (
    Encoding("none", "NoPE", "no positional information (causal mask only)",
             "Kazemnejad et al. 2023, The Impact of Positional Encoding on "
             "Length Generalization in Transformers"),
    Encoding("learned", "learned APE", "learned absolute position table added "
             "to the token embedding", "Vaswani et al. 2017; Radford et al. 2019 (GPT-2)",
             input_term=absolute.Learned()),
    Encoding("sinusoidal", "Sinusoidal APE", "fixed sin/cos of the position "
             "added to the token embedding", "Vaswani et al. 2017, Attention Is "
             "All You Need", input_term=absolute.Sinusoidal()),
    Encoding("rope", "RoPE", "q/k rotated by position (rotate-half layout)",
             "Su et al. 2021, RoFormer", relative=rope.RopeRelative()),
    Encoding("xpos", "xPos", "RoPE with an exponential per-frequency decay of "
             "the score with distance", "Sun et al. 2022, A Length-"
             "Extrapolatable Transformer", relative=xpos.XposRelative()),
    Encoding("randomized_rope", "Randomized RoPE", "RoPE on a sorted random "
             "subset of [0, max_random_position) while training, plain "
             "positions at evaluation", "Ruoss et al. 2023, Randomized "
             "Positional Encodings Boost Length Generalization of Transformers",
             relative=randomized.RandomizedRopeRelative()),
    Encoding("alibi", "ALiBi", "per-head linear distance penalty -m_h (i - j) "
             "on the scores", "Press et al. 2022, Train Short, Test Long",
             relative=alibi.AlibiRelative()),
    Encoding("fire", "FIRE", "learned MLP of the log-transformed, progressively "
             "normalised distance, added to the scores", "Li et al. 2023, "
             "Functional Interpolation for Relative Positions Improves Long "
             "Context Transformers", relative=fire.FireRelative()),
)

BIPE_PAPER = ("He et al. 2024, Two Stones Hit One Bird: Bilevel Positional "
              "Encoding for Better Length Extrapolation")


def _bilevel(base: Encoding) -> Encoding:
  """The BiPE recipe applied to a relative kind: intra table + kind on inter."""
  return dataclasses.replace(
      base, name=f"bipe_{base.name}", short=f"BiPE-{base.short}",
      description=f"intra-segment table + {base.short} on the segment index",
      # The paper's own two are BiPE-RoPE and BiPE-ALiBi; the rest apply its recipe.
      paper=(BIPE_PAPER if base.name in ("rope", "alibi") else
             f"BiPE recipe (He et al. 2024) on {base.paper.split(',')[0]}"),
      input_term=absolute.Intra(), bilevel=True)


_ALL = _BASE + tuple(_bilevel(e) for e in _BASE if e.relative is not None)

KINDS: dict[str, Encoding] = {e.name: e for e in _ALL}
DEFAULT_KIND = "bipe_rope"


def _pe_defaults() -> dict:
  """{pe.* key: default} over the typed parameters of every kind and the intra table."""
  out = {}
  for cls in (absolute.IntraParams, *(e.params_cls for e in _ALL)):
    for key, default in cls.pe_defaults().items():
      if out.setdefault(key, default) != default:
        raise TypeError(f"pe.{key} has two defaults: {out[key]!r} and {default!r}")
  return out


# Every pe.* key but pe.kind, with its default: the base config and ModelConfig read these.
PE_DEFAULTS: dict = _pe_defaults()


def get(kind: str) -> Encoding:
  try:
    return KINDS[kind]
  except KeyError:
    raise ValueError(f"unknown pe.kind {kind!r}; valid kinds: "
                     f"{', '.join(sorted(KINDS))}") from None
