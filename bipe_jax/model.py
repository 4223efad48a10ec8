"""Llama-style decoder with a pluggable positional encoding (Flax Linen, pure).

Positions are inputs: the batch carries `intra`, `inter`, `positions` (flat
index within the document) and `doc_ids`, computed by the input pipeline.
Every parameter carries logical axis names; `bipe_jax.sharding` maps them.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from bipe_jax import attention as attn_lib
from bipe_jax import encodings


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
  pe_kind: str = "bipe_rope"
  max_intra: int = 1024
  intra: str = "learned"
  rope_base: float = 10000.0
  alibi_multiplier: float = 0.0
  max_positions: int = 1024   # absolute-position table size (absolute kinds)
  attention_impl: str = "auto"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "ModelConfig":
    m, pe = config.model, config.pe
    return cls(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers,
               n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_ff=m.d_ff,
               norm_eps=m.norm_eps, init_std=m.init_std, dtype=m.dtype,
               param_dtype=m.param_dtype, pe_kind=pe.kind,
               max_intra=pe.max_intra, intra=pe.intra, rope_base=pe.rope_base,
               alibi_multiplier=pe.alibi_multiplier,
               max_positions=config.data.seq_len,
               attention_impl=config.attention.impl)


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

  @nn.compact
  def __call__(self, x_BLD, batch):
    c = self.cfg
    enc = encodings.get(c.pe_kind)
    dense = lambda n, feats, axes: nn.DenseGeneral(
        feats, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=_init(c.init_std, *axes), name=n)
    q_BLHD = dense("q", (c.n_heads, c.head_dim), ("embed", "heads", "head_dim"))(x_BLD)
    k_BLKD = dense("k", (c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))(x_BLD)
    v_BLKD = dense("v", (c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))(x_BLD)
    pos_BL = batch["inter"] if enc.position == "inter" else batch["positions"]
    if enc.rotary == "rope":
      q_BLHD = encodings.apply_rope(q_BLHD, pos_BL, c.rope_base)
      k_BLKD = encodings.apply_rope(k_BLKD, pos_BL, c.rope_base)
    bias = None
    if enc.bias == "alibi":
      mult = c.alibi_multiplier or enc.default_alibi_multiplier
      slopes_H = jnp.asarray(encodings.alibi_slopes(c.n_heads, mult))
      pos32_BL = pos_BL.astype(jnp.float32)
      bias = attn_lib.Bias(slopes_H, pos32_BL, pos32_BL)
    kernel = attn_lib.get(c.attention_impl)
    out_BLHD = kernel(q_BLHD, k_BLKD, v_BLKD, q_doc_BT=batch["doc_ids"],
                      k_doc_BS=batch["doc_ids"], bias=bias)
    return nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=c.dtype,
                           param_dtype=c.param_dtype, name="o",
                           kernel_init=_init(c.init_std, "heads", "head_dim", "embed"))(out_BLHD)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    c = self.cfg
    dense = lambda n, feats, axes: nn.Dense(
        feats, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=_init(c.init_std, *axes), name=n)
    gate_BLF = dense("gate", c.d_ff, ("embed", "mlp"))(x_BLD)
    up_BLF = dense("up", c.d_ff, ("embed", "mlp"))(x_BLD)
    return dense("down", c.d_model, ("mlp", "embed"))(nn.silu(gate_BLF) * up_BLF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, batch):
    c = self.cfg
    x_BLD = x_BLD + Attention(c, name="attn")(RMSNorm(c.norm_eps, c.param_dtype, name="attn_norm")(x_BLD), batch)
    return x_BLD + MLP(c, name="mlp")(RMSNorm(c.norm_eps, c.param_dtype, name="mlp_norm")(x_BLD))


class PositionTable(nn.Module):
  """Absolute table over ids [0, size): learned (normal 0.02) or fixed sinusoidal."""
  size: int
  d_model: int
  learned: bool
  init_std: float
  param_dtype: str

  @nn.compact
  def __call__(self, ids_BL):
    if self.learned:
      table = self.param("table", _init(self.init_std, "positions", "embed"),
                         (self.size, self.d_model), self.param_dtype)
    else:
      table = jnp.asarray(encodings.sinusoidal_table(self.size, self.d_model))
    return jnp.take(table, jnp.minimum(ids_BL, self.size - 1), axis=0)


class Decoder(nn.Module):
  """Returns float32 logits [B, L, V] for a batch dict (see bipe_jax.data.pipeline).

  `train=True` is passed by the train step together with an rng stream named
  "positions" (for encodings that randomise positions during training).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, batch, train: bool = False):
    c = self.cfg
    enc = encodings.get(c.pe_kind)
    embed = self.param("embed", _init(c.init_std, "vocab", "embed"),
                       (c.vocab_size, c.d_model), c.param_dtype)
    x_BLD = jnp.take(embed, batch["tokens"], axis=0).astype(c.dtype)
    if enc.input_term == "intra":
      x_BLD += PositionTable(c.max_intra, c.d_model, c.intra == "learned", c.init_std,
                             c.param_dtype, name="intra")(batch["intra"]).astype(c.dtype)
    elif enc.input_term is not None:
      x_BLD += PositionTable(c.max_positions, c.d_model, enc.input_term == "absolute_learned",
                             c.init_std, c.param_dtype, name="absolute")(batch["positions"]).astype(c.dtype)
    for i in range(c.n_layers):
      x_BLD = Block(c, name=f"layer_{i}")(x_BLD, batch)
    x_BLD = RMSNorm(c.norm_eps, c.param_dtype, name="final_norm")(x_BLD)
    head = self.param("lm_head", _init(c.init_std, "embed", "vocab"),
                      (c.d_model, c.vocab_size), c.param_dtype)
    return jnp.einsum("bld,dv->blv", x_BLD, head.astype(c.dtype),
                      preferred_element_type=jnp.float32)


def loss_fn(logits_BLV, targets_BL, loss_mask_BL):
  """Mean next-token cross-entropy over masked-in positions; also returns the count."""
  logp_BL = jax.nn.log_softmax(logits_BLV, axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BL, targets_BL[..., None], axis=-1)[..., 0]
  weight_BL = loss_mask_BL.astype(jnp.float32)
  count = jnp.sum(weight_BL)
  return jnp.sum(nll_BL * weight_BL) / jnp.maximum(count, 1.0), count
