"""Config checks that run before any work: unknown keys, invalid choices, shapes.

Every error names the key, the offending value and what would be valid.
"""
from __future__ import annotations


import ml_collections

from bipe_jax import encodings, model, pyconfig
from bipe_jax.configs import base
from bipe_jax.data import levels, pipeline, sources, tokenizer


class ConfigError(ValueError):
  pass


# Choices a module owns are read from it; pe.* values are checked by the
# encodings' typed parameter classes (through ModelConfig).
CHOICES = {
    "data.format": sources.FORMATS,
    "data.packing": pipeline.PACKINGS,
    "segmentation.modality": tokenizer.MODALITIES,
    "train.schedule": ("polynomial", "cosine"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.remat": ("none", *model.REMAT_POLICIES),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
}


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for k, v in c.items():
    path = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flat_keys(v, path + "."))
    else:
      out[path] = v
  return out


def base_keys() -> set[str]:
  return set(flat_keys(base.get_config()))


def load_file(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file path (what --config= names)."""
  return pyconfig.load_get_config(path, "config file", "--config=configs/quickstart.py",
                                  ConfigError)


def read_json(path: str, fix: str):
  """The JSON value in `path`; a damaged file fails naming the path and `fix`."""
  return pyconfig.read_json(path, fix, ConfigError)


def from_saved(saved: dict, source: str = "config.json") -> tuple[ml_collections.ConfigDict, list]:
  """A work dir's saved config over the current defaults: (config, keys defaulted).

  A work dir written before a key existed still loads (the key takes its
  default, which reproduces the old behaviour); a key the current code does
  not know fails, naming it.
  """
  if not isinstance(saved, dict):
    raise ConfigError(f"{source} holds a JSON {type(saved).__name__}, not a config; "
                      "--workdir must be a directory written by bipe-train")
  merged = base.get_config().to_dict()
  known = set(flat_keys(ml_collections.ConfigDict(merged)))
  saved_keys = set(flat_keys(ml_collections.ConfigDict(saved)))
  unknown = sorted(saved_keys - known)
  if unknown:
    raise ConfigError(f"{source} holds keys this version of bipe_jax does not know: "
                      f"{', '.join(unknown)}; evaluate it with the version that wrote it")

  def overlay(into: dict, over: dict) -> None:
    for k, v in over.items():
      if isinstance(v, dict) and isinstance(into.get(k), dict):
        overlay(into[k], v)
      else:
        into[k] = v

  overlay(merged, saved)
  return ml_collections.ConfigDict(merged), sorted(known - saved_keys)


def unknown_key(key: str, known: set[str]) -> str:
  section = key.rsplit(".", 1)[0] if "." in key else ""
  near = sorted(k for k in known if k.startswith(section + ".")) if section else []
  hint = f"; keys under {section!r}: {', '.join(near)}" if near else (
      f"; top-level sections: {', '.join(sorted({k.split('.')[0] for k in known}))}")
  return f"unknown config key {key!r}{hint}"


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first problem found; returns None when valid."""
  known = base_keys()
  for key in flat_keys(config):
    if key not in known:
      raise ConfigError(unknown_key(key, known))
  flat = flat_keys(config)
  for key, valid in CHOICES.items():
    if flat[key] not in valid:
      raise ConfigError(f"invalid {key}={flat[key]!r}; valid: {', '.join(valid)}")
  _positive(flat, "model.d_model", "model.n_layers", "model.n_heads",
            "model.n_kv_heads", "model.d_ff", "data.seq_len",
            "train.batch_size", "train.steps", "train.log_every",
            "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_tokens",
            "train.grad_accum_steps")
  _in_range(flat)
  if config.pe.kind not in encodings.KINDS:
    raise ConfigError(f"invalid pe.kind={config.pe.kind!r}; valid: "
                      f"{', '.join(sorted(encodings.KINDS))}")
  for key in ("attention.block_q", "attention.block_k"):
    if flat[key] < 0:
      raise ConfigError(f"{key}={flat[key]} must be >= 0 (0 = the kernel's default)")
  try:
    # Shapes and every pe.* value, checked by ModelConfig and the typed parameters.
    model.ModelConfig.from_config(config, vocab_size=1)
    encodings.get(config.pe.kind).check_attention(config.attention.impl)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    levels.parse_ids(config.pe.levels, config.segmentation.separator_ids,
                              config.segmentation.level_separator_ids)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.pe.levels > 2 and config.data.source == "arithmetic":
    raise ConfigError(f"pe.levels={config.pe.levels} with data.source='arithmetic': an "
                      "expression's steps are its only units (no blank lines), so a third "
                      "level never ends; use pe.levels=2")
  if not 0.0 <= config.data.heldout_fraction < 1.0:
    raise ConfigError(f"data.heldout_fraction={config.data.heldout_fraction} must be in [0, 1)")
  lengths = tuple(config.eval.lengths)
  if not lengths or any(int(n) < 1 for n in lengths):
    raise ConfigError(f"eval.lengths={lengths} must be a non-empty list of positive ints")
  check_mesh(config)


def check_mesh(config, devices=None) -> None:
  """The mesh fits the devices and every micro-batch splits evenly over the data axes.

  Needs the jax runtime (multi-process: after jax.distributed.initialize).
  """
  from bipe_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    ici, dcn = sharding.mesh_sizes(config, devices)
    rules = sharding.rules(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  sizes = {a: i * d for a, i, d in zip(sharding.AXES, ici, dcn)}
  axes = sharding.batch_axes(rules)
  dp = sharding.data_parallel_size(sizes, rules)
  b, k = config.train.batch_size, config.train.grad_accum_steps
  if b % k:
    raise ConfigError(f"train.batch_size={b} is not divisible by train.grad_accum_steps={k}")
  if (b // k) % dp:
    per = f"train.batch_size={b}" if k == 1 else (
        f"the micro-batch train.batch_size / train.grad_accum_steps = {b} / {k} = {b // k}")
    split = " x ".join(f"{a}={sizes[a]}" for a in axes)
    raise ConfigError(f"{per} is not divisible by the {dp} data-parallel devices "
                      f"(mesh {split}); make the batch a multiple of {dp} or change mesh.shape")


# Numeric keys with bounds: key -> (low, high, low allowed); 0 = "all" where allowed.
_RANGES = {
    "train.lr": (0, None, False), "model.init_std": (0, None, False),
    "model.norm_eps": (0, None, False), "train.clip_norm": (0, None, False),
    "train.poly_power": (0, None, False), "tokenizer.vocab_size": (0, None, False),
    "tokenizer.sample_bytes": (0, None, False), "train.warmup_steps": (0, None, True),
    "train.weight_decay": (0, None, True), "train.end_lr_factor": (0, None, True),
    "data.max_documents": (0, None, True), "eval.max_tokens": (0, None, True),
    "train.b1": (0, 1, True), "train.b2": (0, 1, True),
}


def _in_range(flat):
  for k, (low, high, closed) in _RANGES.items():
    v = flat[k]
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and
          (v >= low if closed else v > low) and (high is None or v < high))
    if not ok:
      bound = f"{'>=' if closed else '>'} {low}" + (f" and < {high}" if high else "")
      raise ConfigError(f"{k}={v!r} must be a number {bound}")


def _positive(flat, *keys):
  for k in keys:
    if not isinstance(flat[k], int) or flat[k] < 1:
      raise ConfigError(f"{k}={flat[k]!r} must be a positive integer")
