"""Positional encodings behind one registry: `pe.kind` -> what the model must do.

An encoding never sees tokens. It is made of up to two parts (encodings.kind),
objects the model asks to act, so no code outside a kind's module names it:
  * an `InputTerm` added to the token embedding (absolute table, or the
    intra-segment table of bilevel kinds),
  * a `Relative` part in each attention layer, from per-token positions: it
    may rotate q/k (the rotary family: rope, xpos, randomized_rope) and may
    add a per-head bias (alibi, fire), an `attention.PositionBias` that the
    kernels evaluate tile by tile and that says itself how to shard.

Kinds (see `KINDS`; each has a typed parameter class next to its code):
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

More than two levels (pe.levels = K > 2, bilevel kinds only): the ids of
bipe_jax.positions.level_ids; every inner level gets a table like the intra
one (absolute.Intra sums them: "table" for intra, "level_<j>" for level j,
read from batch["levels"] [B, K-2, L]) and the relative part reads the
outermost id as `inter`, so no relative kind needs code for it.

Adding a kind (say a relative one, "kerple"):
  1. one module, encodings/kerple.py, with
     - `KerpleParams(params.Params)`: a frozen dataclass whose fields are the
       new `pe.*` keys with their defaults, checked in `__post_init__`
       (`params.positive`, `params.ParamError` naming the key); the base
       config, `ModelConfig` and config validation pick the keys up from it;
     - `KerpleRelative(kind.Relative)`: `params_cls = KerpleParams`, and the
       methods it needs: `rotate` (q/k transform), `bias` (returns a
       `PositionBias`; create parameter-owning Linen submodules there),
       `positions` (randomized positions), `check` (cross-key constraints);
     - for a bias, a `flax.struct.dataclass` subclassing
       `attention.PositionBias` with `block(q_pos, k_pos) -> [B, H, t, s]`;
       the default sharding replicates its parameters and splits positions by
       batch rows; override `partition_specs` / `local_heads` otherwise;
  2. one line in `registry._BASE`:
     `Encoding("kerple", "KERPLE", "<description>", "<paper>", relative=kerple.KerpleRelative())`
     (`bipe_kerple` follows by itself);
  3. one test in tests/test_encodings.py: its scores against a numpy
     implementation of the paper's formula (`np_scores`); the model-level
     tests (causality, chunked == reference, training) run every kind already.
An absolute kind is the same with a `kind.InputTerm` subclass (`embed`) and
`input_term=` in its registry line.

Context extension: every rotary kind reads `pe.rope_scaling` (position
interpolation, NTK-aware, YaRN; rope_scaling.py) through RopeParams, so a
new rotary kind deriving RopeRelative/RopeParams gets it too.

Reproducing the authors' release: pe.release_padding_row=True (the intra
table's last row is zero and never trained) together with data.packing =
"windows" (positions and segments run across documents).
"""
from bipe_jax.encodings import params, rope_scaling
from bipe_jax.encodings.absolute import sinusoidal
from bipe_jax.encodings.alibi import alibi_bias, alibi_slopes
from bipe_jax.encodings.fire import Fire, FireBias
from bipe_jax.encodings.kind import InputTerm, Relative
from bipe_jax.encodings.layers import InputEmbedding, RelativeEncoding, attention_positions
from bipe_jax.encodings.randomized import randomize_positions
from bipe_jax.encodings.registry import DEFAULT_KIND, Encoding, KINDS, PE_DEFAULTS, get
from bipe_jax.encodings.rope import apply_rope
from bipe_jax.encodings.xpos import apply_xpos

__all__ = ["DEFAULT_KIND", "Encoding", "InputTerm", "KINDS", "PE_DEFAULTS", "Relative",
           "get", "params", "rope_scaling", "alibi_bias", "alibi_slopes", "Fire", "FireBias",
           "InputEmbedding", "RelativeEncoding", "attention_positions",
           "randomize_positions", "apply_rope", "apply_xpos", "sinusoidal"]
