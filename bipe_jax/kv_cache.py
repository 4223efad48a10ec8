"""The key/value cache of cached decoding (bipe_jax.decode).

One slot per token of the sequence, `max_len` slots, all rows sharing a write
index (prompts are left-padded, so row b's token at slot s is the same step
for every row). Per layer it holds keys and values in the layout the
attention kernels take ([B, S, K, D]); keys are stored *after* the encoding's
q/k transform (rotated, for the rotary kinds), so a decoding step transforms
only its own query and key. Shared by the layers, per slot:
  pos_BS  the position the relative encoding reads (`inter` for bilevel kinds,
          the flat position otherwise), float32 as biases take it; bias kinds
          (ALiBi, FIRE) evaluate their bias against these key positions;
  doc_BS  document id: padding and unwritten slots hold PAD_DOC, which no
          query of a real token matches, so they are invisible to attention.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# Document id of left padding and of slots not written yet. Distinct from the
# attention kernels' own block-padding ids (-1, -2) and from real ids (>= 0).
PAD_DOC = -3
# Logical axis names of the cache arrays (mapped to mesh axes by config.mesh.rules).
KV_AXES = P("batch", "length", "kv_heads", "head_dim")
SLOT_AXES = P("batch", "length")


@flax.struct.dataclass
class LayerKV:
  """One layer's view of the cache: its keys and values plus the shared slots."""
  k_BSKD: jnp.ndarray
  v_BSKD: jnp.ndarray
  pos_BS: jnp.ndarray
  doc_BS: jnp.ndarray
  index: jnp.ndarray
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def max_len(self) -> int:
    return self.k_BSKD.shape[1]

  def write(self, k_BTKD, v_BTKD) -> "LayerKV":
    """The view with the T new keys and values at slots [index, index + T)."""
    at = (0, self.index, 0, 0)
    return self.replace(
        k_BSKD=jax.lax.dynamic_update_slice(self.k_BSKD, k_BTKD.astype(self.k_BSKD.dtype), at),
        v_BSKD=jax.lax.dynamic_update_slice(self.v_BSKD, v_BTKD.astype(self.v_BSKD.dtype), at))


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, the slots' positions and document ids.

  k, v: tuples (one per layer) of [B, S, K, D]; pos_BS float32, doc_BS int32;
  index: int32 scalar, the next slot to write. `empty` (static): nothing is
  written yet, so the tokens of the next call (the prompt) attend to each
  other only, through the same self-attention kernels as training.
  """
  k: tuple
  v: tuple
  pos_BS: jnp.ndarray
  doc_BS: jnp.ndarray
  index: jnp.ndarray
  empty: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def zeros(cls, cfg, batch: int, max_len: int) -> "KVCache":
    """An empty cache for a ModelConfig `cfg`: `batch` rows of `max_len` slots."""
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    kv = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers))
    return cls(k=kv(), v=kv(), pos_BS=jnp.zeros((batch, max_len), jnp.float32),
               doc_BS=jnp.full((batch, max_len), PAD_DOC, jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.pos_BS.shape[1]

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

  def add_slots(self, pos_BT, doc_BT) -> "KVCache":
    """Records the positions and document ids of T new tokens at [index, index + T)."""
    if self.index.shape != () or pos_BT.shape[1] > self.max_len:
      raise ValueError(f"{pos_BT.shape[1]} tokens do not fit a cache of {self.max_len} slots")
    at = (0, self.index)
    return self.replace(
        pos_BS=jax.lax.dynamic_update_slice(self.pos_BS, pos_BT.astype(jnp.float32), at),
        doc_BS=jax.lax.dynamic_update_slice(self.doc_BS, doc_BT.astype(jnp.int32), at))

  def layer(self, i: int) -> LayerKV:
    return LayerKV(self.k[i], self.v[i], self.pos_BS, self.doc_BS, self.index, self.empty)

  def advance(self, layers, n_new: int) -> "KVCache":
    """The cache after a call that wrote `n_new` tokens into each of `layers`."""
    return self.replace(k=tuple(l.k_BSKD for l in layers), v=tuple(l.v_BSKD for l in layers),
                        index=self.index + n_new, empty=False)

  def logical_axes(self) -> "KVCache":
    """The same tree with each array replaced by its logical PartitionSpec."""
    n = len(self.k)
    return self.replace(k=(KV_AXES,) * n, v=(KV_AXES,) * n, pos_BS=SLOT_AXES,
                        doc_BS=SLOT_AXES, index=P())
