"""Positional encodings behind one registry: `pe.kind` -> what the model must do.

An encoding never sees tokens. It contributes any of three things:
  * an input term added to the token embedding (absolute table, or the
    intra-segment table of bilevel kinds),
  * a q/k transform (the rotary family: rope, xpos, randomized_rope),
  * an additive per-head attention bias described by per-token positions
    (alibi, fire), evaluated by the attention kernel tile by tile.

Kinds (see `KINDS`; each has a typed parameter class in `params`):
  none, learned, sinusoidal                     absolute / no position
  rope, xpos, randomized_rope, alibi, fire      relative, on the flat position
  bipe_<relative kind>                          bilevel, derived automatically

The general BiPE recipe (He et al. 2024). Cut the sequence into segments at
separator tokens; every token gets `intra` (its index inside its segment) and
`inter` (the number of separators before it), see bipe_jax.positions. Then
  1. add an absolute encoding of `intra` to the token embedding (a learned
     table [max_intra, D], or sinusoidal), and
  2. run any *relative* encoding with `inter` as its position.
Tokens of one segment share an inter id, so the relative encoding sees no
distance between them: it models how far apart segments are, while the intra
table says where a token sits inside its segment. Because step 2 only swaps
the position a relative encoding reads, every relative kind K here has a
bilevel twin `bipe_K` built by `registry._bilevel` with no new code:
bipe_rope and bipe_alibi (the paper's two), and bipe_xpos,
bipe_randomized_rope, bipe_fire. A new relative kind gets its twin for free.
Bilevel ALiBi slopes default to x96 (the release's choice).

Reproducing the authors' release: pe.release_padding_row=True (the intra
table's last row is zero and never trained) together with data.packing =
"windows" (positions and segments run across documents).
"""
from bipe_jax.encodings import params
from bipe_jax.encodings.alibi import alibi_bias, alibi_slopes
from bipe_jax.encodings.fire import Fire, FireBias
from bipe_jax.encodings.layers import InputEmbedding, RelativeEncoding, attention_positions
from bipe_jax.encodings.randomized import randomize_positions
from bipe_jax.encodings.registry import Encoding, KINDS, get
from bipe_jax.encodings.rope import apply_rope
from bipe_jax.encodings.tables import sinusoidal
from bipe_jax.encodings.xpos import apply_xpos

__all__ = ["Encoding", "KINDS", "get", "params", "alibi_bias", "alibi_slopes",
           "Fire", "FireBias", "InputEmbedding", "RelativeEncoding",
           "attention_positions", "randomize_positions", "apply_rope",
           "apply_xpos", "sinusoidal"]
