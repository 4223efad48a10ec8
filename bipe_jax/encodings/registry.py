"""The table of encodings: `pe.kind` -> a small frozen description.

Base kinds are written out once; the bilevel (`bipe_*`) version of every
relative kind is derived from it by `_bilevel`, never written by hand.
"""
from __future__ import annotations

import dataclasses

from bipe_jax import attention
from bipe_jax.encodings import params as P


@dataclasses.dataclass(frozen=True)
class Encoding:
  """What one `pe.kind` contributes to the model.

  input_term: None | "learned" | "sinusoidal" (absolute, on flat positions) |
    "intra" (bilevel: table over intra ids, learned or sinusoidal per pe.intra).
  rotary: None | "rope" | "xpos" (q/k transform).
  bias: None | "alibi" | "fire" (additive per-head score bias from positions).
  randomized: rotary/bias positions are a sorted random subset while training.
  position: which per-token position feeds rotary/bias: "flat" (the batch's
    `positions`, restarting per document) or "inter" (segment index).
  params_cls: the typed parameter class of this kind (see encodings.params).
  default_alibi_multiplier: slope multiplier when pe.alibi_multiplier is 0.
  """
  name: str
  short: str
  description: str
  paper: str
  params_cls: type = P.Params
  input_term: str | None = None
  rotary: str | None = None
  bias: str | None = None
  randomized: bool = False
  position: str = "flat"
  default_alibi_multiplier: float = 1.0

  @property
  def bilevel(self) -> bool:
    return self.position == "inter"

  @property
  def relative(self) -> bool:
    return self.rotary is not None or self.bias is not None

  @property
  def bias_kind(self) -> str:
    """What attention kernels see of this kind's bias: "none", "alibi" or "other"."""
    return "none" if self.bias is None else ("alibi" if self.bias == "alibi" else "other")

  def check_attention(self, impl: str, backend: str | None = None) -> None:
    """Raises ValueError unless attention.impl `impl` can run this kind on `backend`."""
    attention.check(impl, self.bias_kind, backend, encoding=self.name)

  def params(self, obj) -> P.Params:
    """Typed parameters of the position part, read from `obj` (a ModelConfig)."""
    return self.params_cls.from_fields(obj).with_defaults(self)

  def intra_params(self, obj) -> P.IntraParams | None:
    """Typed parameters of the intra table (bilevel kinds), else None."""
    return P.IntraParams.from_fields(obj) if self.input_term == "intra" else None


_BASE = (
    Encoding("none", "NoPE", "no positional information (causal mask only)",
             "Kazemnejad et al. 2023, The Impact of Positional Encoding on "
             "Length Generalization in Transformers"),
    Encoding("learned", "learned APE", "learned absolute position table added "
             "to the token embedding", "Vaswani et al. 2017; Radford et al. 2019 (GPT-2)",
             P.LearnedParams, input_term="learned"),
    Encoding("sinusoidal", "Sinusoidal APE", "fixed sin/cos of the position "
             "added to the token embedding", "Vaswani et al. 2017, Attention Is "
             "All You Need", P.SinusoidalParams, input_term="sinusoidal"),
    Encoding("rope", "RoPE", "q/k rotated by position (rotate-half layout)",
             "Su et al. 2021, RoFormer", P.RopeParams, rotary="rope"),
    Encoding("xpos", "xPos", "RoPE with an exponential per-frequency decay of "
             "the score with distance", "Sun et al. 2022, A Length-"
             "Extrapolatable Transformer", P.XposParams, rotary="xpos"),
    Encoding("randomized_rope", "Randomized RoPE", "RoPE on a sorted random "
             "subset of [0, max_random_position) while training, plain "
             "positions at evaluation", "Ruoss et al. 2023, Randomized "
             "Positional Encodings Boost Length Generalization of Transformers",
             P.RandomizedRopeParams, rotary="rope", randomized=True),
    Encoding("alibi", "ALiBi", "per-head linear distance penalty -m_h (i - j) "
             "on the scores", "Press et al. 2022, Train Short, Test Long",
             P.AlibiParams, bias="alibi"),
    Encoding("fire", "FIRE", "learned MLP of the log-transformed, progressively "
             "normalised distance, added to the scores", "Li et al. 2023, "
             "Functional Interpolation for Relative Positions Improves Long "
             "Context Transformers", P.FireParams, bias="fire"),
)

BIPE_PAPER = ("He et al. 2024, Two Stones Hit One Bird: Bilevel Positional "
              "Encoding for Better Length Extrapolation")
# The release multiplies bilevel ALiBi slopes by 96: segment distances are an
# order of magnitude smaller than token distances.
_BILEVEL_ALIBI_MULTIPLIER = 96.0


def _bilevel(base: Encoding) -> Encoding:
  """The BiPE recipe applied to a relative kind: intra table + kind on inter."""
  return dataclasses.replace(
      base, name=f"bipe_{base.name}", short=f"BiPE-{base.short}",
      description=f"intra-segment table + {base.short} on the segment index",
      # The paper's own two are BiPE-RoPE and BiPE-ALiBi; the rest apply its recipe.
      paper=(BIPE_PAPER if base.name in ("rope", "alibi") else
             f"BiPE recipe (He et al. 2024) on {base.paper.split(',')[0]}"),
      input_term="intra", position="inter",
      default_alibi_multiplier=(_BILEVEL_ALIBI_MULTIPLIER if base.bias == "alibi"
                                else base.default_alibi_multiplier))


_ALL = _BASE + tuple(_bilevel(e) for e in _BASE if e.relative)

KINDS: dict[str, Encoding] = {e.name: e for e in _ALL}


def get(kind: str) -> Encoding:
  try:
    return KINDS[kind]
  except KeyError:
    raise ValueError(f"unknown pe.kind {kind!r}; valid kinds: "
                     f"{', '.join(sorted(KINDS))}") from None
