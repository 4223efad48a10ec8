"""Positional-encoding registry: `pe.kind` -> what the model must do.

An encoding contributes any of three things, and never sees tokens:
  * an input term added to the token embedding (intra-segment table, absolute),
  * a q/k transform (the rotary family),
  * an additive per-head attention bias defined by per-token positions.
Rotary and bias terms take their position from `inter` (bilevel kinds) or
from the flat token index (restarting per document), so any relative encoding
becomes bilevel by reading `inter` instead: that is the whole BiPE recipe.
"""
from bipe_jax.encodings.registry import Encoding, KINDS, get
from bipe_jax.encodings.alibi import alibi_slopes
from bipe_jax.encodings.rope import apply_rope
from bipe_jax.encodings.tables import sinusoidal_table

__all__ = ["Encoding", "KINDS", "get", "alibi_slopes", "apply_rope",
           "sinusoidal_table"]
