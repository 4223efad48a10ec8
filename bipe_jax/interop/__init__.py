"""Import of checkpoints and tokenizers made elsewhere (the BiPE release)."""
from bipe_jax.interop import release

__all__ = ["release"]
