"""Import of the BiPE authors' released checkpoints (HF Llama layout, no torch).

A release directory holds `config.json` (HF LlamaConfig plus `rpe_type`,
`train_scale`, `log_scale`), `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and usually the Llama `tokenizer.model`.

Weight layout, PyTorch nn.Linear stores [out, in]; ours are [in, ...]:
  model.embed_tokens.weight             [V, d]     -> embed [V, d]
  model.embeds.0.weight (BiPE only)     [T, d]     -> intra/table [T, d]
  model.layers.{i}.self_attn.q_proj     [H*Dh, d]  -> layer_i/attn/q/kernel [d, H, Dh]
    (k_proj, v_proj likewise with K kv heads)
  model.layers.{i}.self_attn.o_proj     [d, H*Dh]  -> layer_i/attn/o/kernel [H, Dh, d]
  model.layers.{i}.mlp.{gate,up}_proj   [F, d]     -> layer_i/mlp/{gate,up}/kernel [d, F]
  model.layers.{i}.mlp.down_proj        [d, F]     -> layer_i/mlp/down/kernel [F, d]
  model.layers.{i}.input_layernorm      [d]        -> layer_i/attn_norm/scale
  model.layers.{i}.post_attention_layernorm [d]    -> layer_i/mlp_norm/scale
  model.norm.weight                     [d]        -> final_norm/scale
  lm_head.weight                        [V, d]     -> lm_head [d, V]
Rotary weights are already in the rotate-half layout our RoPE uses, so q/k
rows need no permutation. The imported config reproduces the release:
windows across documents, separators (13, 869), intra padding row. A model
exported from here (interop.export) names its own separators and whether its
intra table has the padding row in config.json's `bipe_separator_ids` and
`bipe_intra_padding_row`.
"""
from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from bipe_jax import config as config_lib
from bipe_jax import encodings
from bipe_jax.model import Decoder, ModelConfig

# Llama-tokenizer ids the release treats as separators: 13 "<0x0A>" (newline
# byte) and 869 "▁." (a full stop after a space).
RELEASE_SEPARATOR_IDS = (13, 869)
RELEASE_SEPARATOR_PIECES = {13: "<0x0A>", 869: "\u2581."}
# rpe_type -> (pe.kind, ALiBi slope multiplier of that release model).
RELEASE_KINDS = {"bipe_rope": ("bipe_rope", 0.0), "rope": ("rope", 0.0),
                 "bipe_alibi": ("bipe_alibi", 96.0), "alibi": ("alibi", 1.0)}
# Buffers some transformers versions save alongside the weights.
_IGNORED = re.compile(r".*\.(rotary_emb\.inv_freq|alibi)$")


class ReleaseError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Imported:
  """An imported release: our experiment config, model config and params."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  params: dict


def read_hf_config(ckpt_dir: str) -> dict:
  path = os.path.join(ckpt_dir, "config.json")
  if not os.path.isfile(path):
    raise ReleaseError(f"--hf_checkpoint={ckpt_dir!r}: no config.json there")
  hf = config_lib.read_json(path, "the release's config.json must be the HF LlamaConfig "
                            "JSON it was published with; download it again")
  if not isinstance(hf, dict):
    raise ReleaseError(f"{path} holds a JSON {type(hf).__name__}, not a model config")
  return hf


def _need(hf: dict, key: str):
  if key not in hf:
    raise ReleaseError(f"config.json lacks {key!r}")
  return hf[key]


def model_config(hf: dict) -> ModelConfig:
  """Our ModelConfig for a release config.json (dict). Fails on what we lack."""
  rpe = _need(hf, "rpe_type")
  if rpe not in RELEASE_KINDS:
    raise ReleaseError(f"config.json rpe_type={rpe!r}; supported: "
                       f"{', '.join(RELEASE_KINDS)}")
  if hf.get("log_scale"):
    raise ReleaseError("config.json log_scale=true (query scaling by log(pos+1)) "
                       "is not part of the method and is not supported")
  if hf.get("rope_scaling"):
    raise ReleaseError(f"config.json rope_scaling={hf['rope_scaling']!r} is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise ReleaseError(f"config.json hidden_act={hf['hidden_act']!r}; only silu")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ReleaseError("config.json asks for projection biases; the release has none")
  kind, multiplier = RELEASE_KINDS[rpe]
  d, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
  train_scale = int(_need(hf, "train_scale"))
  return ModelConfig(
      vocab_size=int(_need(hf, "vocab_size")), d_model=int(d),
      n_layers=int(_need(hf, "num_hidden_layers")), n_heads=int(heads),
      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
      d_ff=int(_need(hf, "intermediate_size")),
      norm_eps=float(_need(hf, "rms_norm_eps")),
      init_std=float(hf.get("initializer_range", 0.02)), pe_kind=kind,
      max_intra=train_scale, intra="learned",
      rope_base=float(hf.get("rope_theta", 10000.0)), alibi_multiplier=multiplier,
      release_padding_row=_flag(hf, "bipe_intra_padding_row", True),
      max_positions=train_scale)


def _flag(hf: dict, key: str, default: bool) -> bool:
  value = hf.get(key, default)
  if not isinstance(value, bool):
    raise ReleaseError(f"config.json {key}={value!r} must be true or false")
  return value


def separator_ids(hf: dict) -> tuple[int, ...]:
  """config.json's `bipe_separator_ids` (written by interop.export), else the release's."""
  ids = hf.get("bipe_separator_ids", RELEASE_SEPARATOR_IDS)
  if not (isinstance(ids, (list, tuple)) and ids
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
    raise ReleaseError(f"config.json bipe_separator_ids={ids!r} must be a non-empty list "
                       "of token ids")
  return tuple(ids)


def experiment_config(hf: dict, ckpt_dir: str = "") -> ml_collections.ConfigDict:
  """bipe_jax/configs/base.py with everything a release model needs to evaluate as trained."""
  from bipe_jax.configs import base  # pylint: disable=g-import-not-at-top
  m = model_config(hf)
  c = base.get_config()
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "norm_eps",
              "init_std"):
    setattr(c.model, key, getattr(m, key))
  c.model.dtype = c.model.param_dtype = "float32"
  c.pe.kind = m.pe_kind
  for key in ("max_intra", "intra", "rope_base", "alibi_multiplier",
              "release_padding_row"):
    setattr(c.pe, key, getattr(m, key))
  c.data.seq_len = m.max_intra          # train_scale: the training window
  c.data.packing = "windows"            # positions run across documents
  c.segmentation.modality = "text"
  c.segmentation.separator_ids = separator_ids(hf)
  c.tokenizer.vocab_size = m.vocab_size
  tok = os.path.join(ckpt_dir, "tokenizer.model") if ckpt_dir else ""
  c.tokenizer.model = os.path.abspath(tok) if tok and os.path.isfile(tok) else ""
  return c


def read_tensors(ckpt_dir: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors (or its shards) as numpy arrays."""
  single = os.path.join(ckpt_dir, "model.safetensors")
  index = os.path.join(ckpt_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    listing = config_lib.read_json(index, "download it again")
    weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
    if not isinstance(weight_map, dict):
      raise ReleaseError(f"{index} has no weight_map object; download it again")
    shards = sorted(set(weight_map.values()))
    files = [os.path.join(ckpt_dir, s) for s in shards]
  else:
    found = ", ".join(sorted(os.listdir(ckpt_dir))) if os.path.isdir(ckpt_dir) else "nothing"
    raise ReleaseError(f"--hf_checkpoint={ckpt_dir!r}: no model.safetensors (or "
                       f"index); found {found}. A pytorch_model.bin must first be "
                       "re-saved as safetensors (this project does not use torch).")
  tensors = {}
  for path in files:
    try:
      tensors.update(st_numpy.load_file(path))
    except SafetensorError as e:
      raise ReleaseError(f"{path} is not a readable safetensors file ({e}); "
                         "download it again") from None
  return tensors


def _check_alibi_buffer(tensors: dict, m: ModelConfig) -> None:
  """If the release saved its ALiBi buffer, its slopes must equal ours."""
  buf = next((v for k, v in tensors.items() if k.endswith("self_attn.alibi")), None)
  if buf is None or buf.shape[-1] < 2:
    return
  theirs = np.asarray(buf, np.float32).reshape(m.n_heads, -1)[:, 1]
  ours = encodings.alibi_slopes(m.n_heads, m.pe_params.alibi_multiplier)
  if not np.allclose(theirs, ours, rtol=2e-3):
    raise ReleaseError(f"the checkpoint's ALiBi slopes {theirs} differ from ours {ours}")


def params_from_tensors(tensors: dict, m: ModelConfig) -> dict:
  """Our params pytree (plain float arrays, unboxed) from release tensors."""
  t = dict(tensors)
  used = set()

  def take(name, dtype=np.float32):
    if name not in t:
      raise ReleaseError(f"model.safetensors lacks tensor {name!r}")
    used.add(name)
    return np.asarray(t[name]).astype(dtype)

  d, h, kv, dh = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
  params = {"embed": take("model.embed_tokens.weight")}
  if m.encoding.bilevel:
    table = take("model.embeds.0.weight")
    if table.shape != (m.max_intra, d):
      raise ReleaseError(f"model.embeds.0.weight is {table.shape}; expected "
                         f"(train_scale={m.max_intra}, hidden_size={d})")
    params["intra"] = {"table": table}
  for i in range(m.n_layers):
    pre = f"model.layers.{i}."
    lin = lambda n: take(pre + n + ".weight").T  # [out, in] -> [in, out]
    params[f"layer_{i}"] = {
        "attn_norm": {"scale": take(pre + "input_layernorm.weight")},
        "attn": {
            "q": {"kernel": lin("self_attn.q_proj").reshape(d, h, dh)},
            "k": {"kernel": lin("self_attn.k_proj").reshape(d, kv, dh)},
            "v": {"kernel": lin("self_attn.v_proj").reshape(d, kv, dh)},
            "o": {"kernel": lin("self_attn.o_proj").reshape(h, dh, d)},
        },
        "mlp_norm": {"scale": take(pre + "post_attention_layernorm.weight")},
        "mlp": {n: {"kernel": lin(f"mlp.{n}_proj")} for n in ("gate", "up", "down")},
    }
  params["final_norm"] = {"scale": take("model.norm.weight")}
  head = "lm_head.weight" if "lm_head.weight" in t else "model.embed_tokens.weight"
  params["lm_head"] = take(head).T
  extra = sorted(k for k in t if k not in used and not _IGNORED.match(k))
  if extra:
    raise ReleaseError(f"model.safetensors has tensors this importer does not "
                       f"know: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  _check_alibi_buffer(t, m)
  _check_structure(params, m)
  return params


def _check_structure(params: dict, m: ModelConfig) -> None:
  """Imported tree == the tree Decoder.init builds (names and shapes)."""
  batch = {k: np.zeros((1, 2), np.int32) for k in ("tokens", "positions", "intra",
                                                   "inter", "doc_ids")}
  abstract = jax.eval_shape(lambda: Decoder(m).init(jax.random.key(0), batch))
  want = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract["params"]))
  got = jax.tree.map(lambda x: x.shape, params)
  if want != got:
    raise ReleaseError(f"imported params do not match the model:\n want {want}\n got {got}")


def load_tokenizer(ckpt_dir: str):
  """(Tokenizer, separator table [V] bool) for the release's Llama tokenizer.

  Separators are exactly RELEASE_SEPARATOR_IDS; fails if this vocabulary does
  not hold the expected pieces there (a different tokenizer).
  """
  from bipe_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.load(os.path.join(ckpt_dir, "tokenizer.model"))
  for i, piece in RELEASE_SEPARATOR_PIECES.items():
    got = tok.sp.id_to_piece(i) if i < tok.vocab_size else None
    if got != piece:
      raise ReleaseError(f"tokenizer.model: id {i} is {got!r}, the release's "
                         f"separator is {piece!r}; not the Llama vocabulary")
  return tok, tok.separator_table("text", explicit_ids=RELEASE_SEPARATOR_IDS)


def load(ckpt_dir: str) -> Imported:
  """Reads a release directory into (config, model config, params)."""
  hf = read_hf_config(ckpt_dir)
  m = model_config(hf)
  params = params_from_tensors(read_tensors(ckpt_dir), m)
  return Imported(experiment_config(hf, ckpt_dir), m, params)
