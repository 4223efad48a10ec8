"""Export of a BiPE-RoPE or RoPE model trained here in the release's HF Llama layout.

    bipe-convert --to_hf=OUT --workdir=DIR

writes OUT/config.json (HF LlamaConfig plus the release's `rpe_type`,
`train_scale`, `log_scale`), OUT/model.safetensors (float32) and the
tokenizer (tokenizer.model, tokenizer_config.json, special_tokens_map.json):
the exact inverse of interop.release, so `bipe-convert --hf_checkpoint=OUT`
and `bipe-eval --hf_checkpoint=OUT` load it back with the same logits.

Two things the release's config cannot say go into keys of our own, which
the importer reads and the release's code ignores:
  * `bipe_separator_ids`: the release hard-codes the Llama ids (13, 869);
    ours come from our tokenizer;
  * `bipe_intra_padding_row`: our importer reads the intra table's last row
    as zero (the release's padding row, `pe.release_padding_row`); a table
    trained without that quirk says false, and its last row is read as
    trained (the release's nn.Embedding lookup returns a stored row as it is).
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from safetensors import numpy as st_numpy

from bipe_jax import evaluate
from bipe_jax import config as config_lib
from bipe_jax.data.tokenizer import Tokenizer, run_tokenizer_path
from bipe_jax.model import ModelConfig

EXPORTABLE = ("bipe_rope", "rope")
# The files export writes into --to_hf.
WRITTEN = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
           "special_tokens_map.json")


def check_exportable(config) -> None:
  """Raises ConfigError unless the release's layout can hold this run's model."""
  pe = config.pe
  if pe.kind not in EXPORTABLE:
    raise config_lib.ConfigError(
        f"pe.kind={pe.kind!r} cannot be exported: --to_hf writes the release's "
        f"BiPE-RoPE and RoPE models ({', '.join(EXPORTABLE)}) only")
  if pe.kind == "bipe_rope" and pe.intra != "learned":
    raise config_lib.ConfigError(f"pe.intra={pe.intra!r} cannot be exported: the release's "
                                 "intra-segment table is learned")
  if pe.levels != 2:
    raise config_lib.ConfigError(f"pe.levels={pe.levels} cannot be exported: the release's "
                                 "layout has two levels (intra and inter) only")
  if pe.rope_scaling.kind != "none":
    raise config_lib.ConfigError(
        f"pe.rope_scaling.kind={pe.rope_scaling.kind!r} cannot be exported: the release's "
        "config has no exact equivalent. The parameters do not depend on it: export is of "
        "the unscaled model, so train or convert without it and apply it at evaluation")


def tensors_from_params(params: dict, m: ModelConfig) -> dict[str, np.ndarray]:
  """Release tensors (float32, [out, in] linears) from our params pytree (numpy)."""
  d, h, dh = m.d_model, m.n_heads, m.head_dim
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  lin = lambda x, rows: f32(np.asarray(x).reshape(rows, -1).T)  # [in, ...] -> [out, in]
  t = {"model.embed_tokens.weight": f32(params["embed"]),
       "model.norm.weight": f32(params["final_norm"]["scale"]),
       "lm_head.weight": f32(np.asarray(params["lm_head"]).T)}
  if m.encoding.bilevel:
    t["model.embeds.0.weight"] = f32(params["intra"]["table"])
  for i in range(m.n_layers):
    p, pre = params[f"layer_{i}"], f"model.layers.{i}."
    attn, mlp = p["attn"], p["mlp"]
    t.update({
        pre + "input_layernorm.weight": f32(p["attn_norm"]["scale"]),
        pre + "post_attention_layernorm.weight": f32(p["mlp_norm"]["scale"]),
        pre + "self_attn.q_proj.weight": lin(attn["q"]["kernel"], d),
        pre + "self_attn.k_proj.weight": lin(attn["k"]["kernel"], d),
        pre + "self_attn.v_proj.weight": lin(attn["v"]["kernel"], d),
        pre + "self_attn.o_proj.weight": lin(attn["o"]["kernel"], h * dh),
        pre + "mlp.gate_proj.weight": lin(mlp["gate"]["kernel"], d),
        pre + "mlp.up_proj.weight": lin(mlp["up"]["kernel"], d),
        pre + "mlp.down_proj.weight": lin(mlp["down"]["kernel"], m.d_ff),
    })
  return t


def hf_config(m: ModelConfig, train_scale: int, tok: Tokenizer, separator_ids) -> dict:
  """The release's config.json for `m` (see interop.release.model_config)."""
  eos = tok.sp.eos_id()
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32",
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
      num_key_value_heads=m.n_kv_heads, hidden_act="silu", rms_norm_eps=m.norm_eps,
      initializer_range=m.init_std, rope_theta=m.rope_base, rope_scaling=None,
      max_position_embeddings=train_scale, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, pretraining_tp=1,
      bos_token_id=tok.bos_id, eos_token_id=eos if eos >= 0 else tok.bos_id, pad_token_id=-1,
      rpe_type=m.pe_kind, train_scale=train_scale, log_scale=False,
      bipe_separator_ids=[int(i) for i in separator_ids],
      bipe_intra_padding_row=bool(m.release_padding_row))


def _write_tokenizer(tok: Tokenizer, out: str, train_scale: int) -> None:
  shutil.copyfile(tok.model_path, os.path.join(out, "tokenizer.model"))
  piece = lambda i: tok.sp.id_to_piece(i) if 0 <= i < tok.vocab_size else None
  special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.sp.eos_id()),
             "unk_token": piece(tok.sp.unk_id())}
  special = {k: v for k, v in special.items() if v is not None}
  files = {"special_tokens_map.json": special,
           "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                     "add_eos_token": False, "model_max_length": train_scale,
                                     **special}}
  for name, content in files.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=1)


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the checkpoint of `workdir` (latest, or `step`) to `out`; returns `out`."""
  config = evaluate.load_config(workdir)
  check_exportable(config)
  # Nothing already there is overwritten (e.g. --to_hf=DIR: the run's own config.json).
  taken = [os.path.join(out, n) for n in WRITTEN if os.path.lexists(os.path.join(out, n))]
  if taken:
    raise FileExistsError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; "
                          "choose a new --to_hf")
  tok = Tokenizer.load(run_tokenizer_path(config, workdir))
  seg = config.segmentation
  separators = np.flatnonzero(tok.separator_table(seg.modality, seg.cot_delimiter,
                                                  seg.separator_ids))
  config.mesh.shape, config.mesh.dcn_shape = "data=-1", ""   # parameters whole on each device
  trainer, state = evaluate.restore_params(config, workdir, tok.vocab_size, step)
  m = trainer.model_cfg
  params = jax.device_get(state.params)
  train_scale = m.max_intra if m.encoding.bilevel else m.max_positions
  os.makedirs(out, exist_ok=True)
  st_numpy.save_file(tensors_from_params(params, m),
                     os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config(m, train_scale, tok, separators), f, indent=1)
  _write_tokenizer(tok, out, train_scale)
  return out
