"""Llama-style decoder with a pluggable positional encoding (Flax Linen, pure).

Positions are inputs: the batch carries `intra`, `inter`, `positions` (flat
index within the document), `doc_ids` and, with pe.levels > 2, `levels` (the
ids between intra and inter), computed by the input pipeline.
Every parameter carries logical axis names; `bipe_jax.sharding` maps them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bipe_jax import attention as attn_lib
from bipe_jax import encodings


def _with_pe_fields(cls):
  """Adds one field per pe.* key, its type and default from the typed parameter
  classes (encodings.PE_DEFAULTS), so a key and its default are written once."""
  for key, default in encodings.PE_DEFAULTS.items():
    cls.__annotations__[key] = type(default).__name__
    setattr(cls, key, default)
  return cls


@dataclasses.dataclass(frozen=True)
@_with_pe_fields
class ModelConfig:
  """Decoder shape plus the `pe.*` fields the encoding's typed params read.

  Besides the fields written here it has one field per `pe.*` key
  (max_intra, intra, rope_base, alibi_multiplier, ...; see
  encodings.PE_DEFAULTS), defaulting as the typed parameter classes say.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  pe_kind: str = encodings.DEFAULT_KIND
  # data.seq_len: the training length, and the learned absolute table's size.
  max_positions: int = encodings.absolute.LearnedParams.max_positions
  attention_impl: str = "auto"
  attention_block_q: int = 0      # 0 = the kernel's default
  attention_block_k: int = 0
  remat: str = "none"         # train.remat: see REMAT_POLICIES

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by "
                       f"model.n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")
    # Raises on an unknown pe.kind (naming the valid ones) and on a bad pe.*
    # value (naming the key).
    self.encoding.check(self)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def encoding(self) -> encodings.Encoding:
    return encodings.get(self.pe_kind)

  @property
  def pe_params(self) -> encodings.params.Params:
    """Typed parameters of this kind's position part (validated)."""
    return self.encoding.params(self)

  @property
  def intra_params(self) -> encodings.absolute.IntraParams | None:
    return self.encoding.intra_params(self)

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "ModelConfig":
    m, pe = config.model, config.pe
    # A key missing from an older saved config takes its default.
    # Lists (from a saved config.json) become tuples: the config is hashable.
    pe_fields = {k: encodings.params.from_config(
                     d, tuple(pe[k]) if isinstance(pe[k], list) else pe[k])
                 for k, d in encodings.PE_DEFAULTS.items() if k in pe}
    return cls(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers,
               n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_ff=m.d_ff,
               norm_eps=m.norm_eps, init_std=m.init_std, dtype=m.dtype,
               param_dtype=m.param_dtype, pe_kind=pe.kind, **pe_fields,
               max_positions=config.data.seq_len,
               attention_impl=config.attention.impl,
               attention_block_q=config.attention.get("block_q", 0),
               attention_block_k=config.attention.get("block_k", 0),
               remat=config.train.get("remat", "none"))


# What a rematerialised block keeps from its forward pass (None: only its inputs).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _constrain(x, rules, *axes):
  # Pins activation layouts by `rules` under a mesh (a Trainer's); a no-op
  # without rules or outside a mesh.
  return nn.with_logical_constraint(x, axes, rules=rules) if rules else x


def _init(std, *axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * scale).astype(x.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  rules: Any = None

  @nn.compact
  def __call__(self, x_BLD, batch, pos_BL, kv=None):
    """kv: this layer's view of a kv_cache.KVCache (cached decoding), or None.
    With kv it returns (output, kv with the new keys and values written)."""
    c = self.cfg
    dense = lambda n, feats, axes: nn.DenseGeneral(
        feats, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=_init(c.init_std, *axes), name=n)
    q_BLHD = dense("q", (c.n_heads, c.head_dim), ("embed", "heads", "head_dim"))(x_BLD)
    k_BLKD = dense("k", (c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))(x_BLD)
    v_BLKD = dense("v", (c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))(x_BLD)
    q_BLHD, k_BLKD, bias = encodings.RelativeEncoding(
        c.encoding, c.pe_params, c.n_heads, c.param_dtype, span=kv.max_len if kv else 0,
        name="pe")(q_BLHD, k_BLKD, pos_BL)
    impl = c.attention_impl
    if kv is not None:
      kv = kv.write(k_BLKD, v_BLKD)
      # A step attending to the cache has other keys than queries (cuDNN cannot).
      impl = "auto" if impl == "cudnn" and not kv.empty else impl
    kernel = attn_lib.get(impl, block_q=c.attention_block_q, block_k=c.attention_block_k)
    if kv is None or kv.empty:
      # Training, evaluation, and a prompt into an empty cache: self-attention.
      out_BLHD = kernel(q_BLHD, k_BLKD, v_BLKD, q_doc_BT=batch["doc_ids"],
                        k_doc_BS=batch["doc_ids"], bias=bias)
    else:
      out_BLHD = kernel(q_BLHD, kv.k_BSKD, kv.v_BSKD, q_doc_BT=batch["doc_ids"],
                        k_doc_BS=kv.doc_BS, q_offset=kv.index,
                        bias=None if bias is None else bias.with_keys(kv.pos_BS))
    out_BLHD = _constrain(out_BLHD, self.rules, "batch", "length", "heads", "head_dim")
    out_BLD = nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=c.dtype,
                              param_dtype=c.param_dtype, name="o",
                              kernel_init=_init(c.init_std, "heads", "head_dim", "embed"))(out_BLHD)
    return out_BLD if kv is None else (out_BLD, kv)


class MLP(nn.Module):
  cfg: ModelConfig
  rules: Any = None

  @nn.compact
  def __call__(self, x_BLD):
    c = self.cfg
    dense = lambda n, feats, axes: nn.Dense(
        feats, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=_init(c.init_std, *axes), name=n)
    # Rows flattened to [B*L, D]: on XLA:CPU this MLP's forward+backward takes
    # 1.33x as long on [B, L, D] operands (benchmarks/mlp_layout.py); the math
    # and the parameters are the same, and B stays the major (sharded) dim.
    b, l, d = x_BLD.shape
    x_ND = x_BLD.reshape(b * l, d)
    gate_NF = dense("gate", c.d_ff, ("embed", "mlp"))(x_ND)
    up_NF = dense("up", c.d_ff, ("embed", "mlp"))(x_ND)
    h_NF = _constrain(nn.silu(gate_NF) * up_NF, self.rules, "batch", "mlp")
    return dense("down", c.d_model, ("mlp", "embed"))(h_NF).reshape(b, l, d)


class Block(nn.Module):
  cfg: ModelConfig
  rules: Any = None

  @nn.compact
  def __call__(self, x_BLD, batch, pos_BL, kv=None):
    c = self.cfg
    h_BLD = RMSNorm(c.norm_eps, c.param_dtype, name="attn_norm")(x_BLD)
    attn = Attention(c, self.rules, name="attn")(h_BLD, batch, pos_BL, kv)
    if kv is not None:
      attn, kv = attn
    x_BLD = x_BLD + attn
    h_BLD = RMSNorm(c.norm_eps, c.param_dtype, name="mlp_norm")(x_BLD)
    x_BLD = x_BLD + MLP(c, self.rules, name="mlp")(h_BLD)
    x_BLD = _constrain(x_BLD, self.rules, "batch", "length", "embed")
    return x_BLD if kv is None else (x_BLD, kv)


class Decoder(nn.Module):
  """Returns float32 logits [B, L, V] for a batch dict (see bipe_jax.data.pipeline).

  The batch needs tokens, positions, doc_ids, and intra/inter for bilevel
  kinds (all [B, L] int), and levels [B, K-2, L] int with pe.levels = K > 2. `train=True` is passed by the train step together
  with an rng stream named "positions" (randomized kinds draw from it).

  cache: a kv_cache.KVCache for cached decoding (bipe_jax.decode): the batch
  holds the next L tokens of each row (the prompt, then one at a time); they
  are written at the cache's index and attend to everything written before.
  Returns (logits, the cache after them) then. last_only: logits of the last
  position only, [B, 1, V].

  activation_rules: logical axis -> mesh axes (`bipe_jax.sharding.rules`)
  pinning activation layouts under a mesh; None leaves them to the compiler.
  They are deliberately not flax's global `nn.logical_axis_rules`: with those
  set, flax's parameter shape check constrains DenseGeneral kernels on their
  flattened shapes and fails.
  """
  cfg: ModelConfig
  activation_rules: Any = None

  @nn.compact
  def __call__(self, batch, train: bool = False, cache=None, last_only: bool = False):
    c = self.cfg
    enc = c.encoding
    embed = self.param("embed", _init(c.init_std, "vocab", "embed"),
                       (c.vocab_size, c.d_model), c.param_dtype)
    x_BLD = jnp.take(embed, batch["tokens"], axis=0).astype(c.dtype)
    pe_BLD = encodings.InputEmbedding(
        enc, c.pe_params, c.intra_params, c.d_model, c.init_std, c.param_dtype,
        name="intra" if enc.bilevel else "absolute")(batch)
    if pe_BLD is not None:
      x_BLD = x_BLD + pe_BLD.astype(c.dtype)
    key = self.make_rng("positions") if enc.randomized and train else None
    pos_BL = encodings.attention_positions(enc, c.pe_params, batch, train, key)
    rules = self.activation_rules
    x_BLD = _constrain(x_BLD, rules, "batch", "length", "embed")
    if cache is not None:
      cache = cache.add_slots(pos_BL, batch["doc_ids"])
      layers = []
    block = (Block if c.remat == "none" or cache is not None
             else nn.remat(Block, policy=REMAT_POLICIES[c.remat]))
    for i in range(c.n_layers):
      if cache is None:
        x_BLD = block(c, rules, name=f"layer_{i}")(x_BLD, batch, pos_BL)
      else:
        x_BLD, kv = block(c, rules, name=f"layer_{i}")(x_BLD, batch, pos_BL, cache.layer(i))
        layers.append(kv)
    if last_only:
      x_BLD = x_BLD[:, -1:]  # a long prompt's logits [B, L, V] would be all but unused
    x_BLD = RMSNorm(c.norm_eps, c.param_dtype, name="final_norm")(x_BLD)
    head = self.param("lm_head", _init(c.init_std, "embed", "vocab"),
                      (c.d_model, c.vocab_size), c.param_dtype)
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, head.astype(c.dtype),
                            preferred_element_type=jnp.float32)
    logits_BLV = _constrain(logits_BLV, rules, "batch", "length", "vocab")
    if cache is None:
      return logits_BLV
    return logits_BLV, cache.advance(layers, batch["tokens"].shape[1])


def loss_fn(logits_BLV, targets_BL, loss_mask_BL):
  """Mean next-token cross-entropy over masked-in positions; also returns the count."""
  logp_BL = jax.nn.log_softmax(logits_BLV, axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BL, targets_BL[..., None], axis=-1)[..., 0]
  weight_BL = loss_mask_BL.astype(jnp.float32)
  count = jnp.sum(weight_BL)
  return jnp.sum(nll_BL * weight_BL) / jnp.maximum(count, 1.0), count
