"""The table of encodings. Each kind is a small frozen description."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Encoding:
  """What one `pe.kind` contributes.

  input_term: None | "intra" (bilevel: table over intra ids, learned or
    sinusoidal per `pe.intra`) | "absolute_learned" | "absolute_sinusoidal".
  rotary: None | "rope".
  bias: None | "alibi".
  position: which per-token position feeds rotary/bias: "inter" or "flat".
  default_alibi_multiplier: slope multiplier when `pe.alibi_multiplier` is 0.
  """
  name: str
  description: str
  input_term: str | None = None
  rotary: str | None = None
  bias: str | None = None
  position: str = "flat"
  default_alibi_multiplier: float = 1.0

  @property
  def bilevel(self) -> bool:
    return self.position == "inter"


_ALL = (
    Encoding("none", "NoPE: no positional information (causal mask only)"),
    Encoding("rope", "RoPE (Su et al. 2021) on token positions", rotary="rope"),
    Encoding("alibi", "ALiBi (Press et al. 2022) on token positions", bias="alibi"),
    Encoding("bipe_rope", "BiPE-RoPE (He et al. 2024): intra table + RoPE on "
             "segment index", input_term="intra", rotary="rope", position="inter"),
    Encoding("bipe_alibi", "BiPE-ALiBi (He et al. 2024): intra table + ALiBi "
             "on segment index, slopes x96", input_term="intra", bias="alibi",
             position="inter", default_alibi_multiplier=96.0),
)

KINDS: dict[str, Encoding] = {e.name: e for e in _ALL}


def get(kind: str) -> Encoding:
  try:
    return KINDS[kind]
  except KeyError:
    raise ValueError(f"unknown pe.kind {kind!r}; valid kinds: "
                     f"{', '.join(sorted(KINDS))}") from None
