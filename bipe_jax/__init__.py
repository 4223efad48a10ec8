"""bipe_jax: Bilevel Positional Encoding (BiPE) language models in JAX/Flax.

Entry points: `bipe-train` (bipe_jax.train), `bipe-eval` (bipe_jax.evaluate),
`bipe-convert` (bipe_jax.convert). See README.md.
"""
__version__ = "0.1.0"
