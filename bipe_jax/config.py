"""Config checks that run before any work: unknown keys, invalid choices, shapes.

Every error names the key, the offending value and what would be valid.
"""
from __future__ import annotations

import importlib.util
import re
import sys

import ml_collections

from bipe_jax import encodings
from bipe_jax.configs import base


class ConfigError(ValueError):
  pass


CHOICES = {
    "data.format": ("auto", "text", "jsonl", "arrayrecord"),
    "data.packing": ("windows", "documents"),
    "segmentation.modality": ("text", "code", "cot"),
    "pe.intra": ("learned", "sinusoidal"),
    "train.schedule": ("polynomial", "cosine"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.remat": ("none", "full", "dots", "dots_no_batch"),
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
  spec = importlib.util.spec_from_file_location("_bipe_config", path)
  if spec is None:
    raise ConfigError(f"cannot load config file {path!r}: pass a .py file such "
                      "as configs/quickstart.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except FileNotFoundError:
    raise ConfigError(f"config file {path!r} does not exist") from None
  return module.get_config()


def check_overrides(argv: list[str]) -> None:
  """Fails on `--config.KEY=...` for a KEY the base config does not declare.

  Runs before absl parses flags so the user sees one clear line instead of a
  traceback from ml_collections.
  """
  known = base_keys()
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if m and m.group(1) not in known:
      raise ConfigError(_unknown(m.group(1), known))


def from_saved(saved: dict, source: str = "config.json") -> tuple[ml_collections.ConfigDict, list]:
  """A work dir's saved config over the current defaults: (config, keys defaulted).

  A work dir written before a key existed still loads (the key takes its
  default, which reproduces the old behaviour); a key the current code does
  not know fails, naming it.
  """
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


def _unknown(key: str, known: set[str]) -> str:
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
      raise ConfigError(_unknown(key, known))
  flat = flat_keys(config)
  for key, valid in CHOICES.items():
    if flat[key] not in valid:
      raise ConfigError(f"invalid {key}={flat[key]!r}; valid: {', '.join(valid)}")
  if config.pe.kind not in encodings.KINDS:
    raise ConfigError(f"invalid pe.kind={config.pe.kind!r}; valid: "
                      f"{', '.join(sorted(encodings.KINDS))}")
  try:
    encodings.get(config.pe.kind).check_attention(config.attention.impl)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  from bipe_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top
  try:
    ModelConfig.from_config(config, vocab_size=1)  # typed per-kind pe parameters
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if (encodings.get(config.pe.kind).randomized
      and config.pe.max_random_position < config.data.seq_len):
    raise ConfigError(f"pe.max_random_position={config.pe.max_random_position} must be "
                      f">= data.seq_len={config.data.seq_len}")
  m = config.model
  _positive(flat, "model.d_model", "model.n_layers", "model.n_heads",
            "model.n_kv_heads", "model.d_ff", "data.seq_len", "pe.max_intra",
            "train.batch_size", "train.steps", "train.log_every",
            "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_tokens",
            "train.grad_accum_steps")
  for key in ("attention.block_q", "attention.block_k"):
    if flat[key] < 0:
      raise ConfigError(f"{key}={flat[key]} must be >= 0 (0 = the kernel's default)")
  if m.d_model % m.n_heads:
    raise ConfigError(f"model.d_model={m.d_model} must be divisible by "
                      f"model.n_heads={m.n_heads}")
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of "
                      f"model.n_kv_heads={m.n_kv_heads}")
  if encodings.get(config.pe.kind).rotary and (m.d_model // m.n_heads) % 2:
    raise ConfigError(f"pe.kind={config.pe.kind!r} rotates pairs of dims: head dim "
                      f"{m.d_model // m.n_heads} must be even")
  if not 0.0 <= config.data.heldout_fraction < 1.0:
    raise ConfigError(f"data.heldout_fraction={config.data.heldout_fraction} must be in [0, 1)")
  if config.train.warmup_steps < 0 or config.train.lr <= 0:
    raise ConfigError("train.lr must be > 0 and train.warmup_steps >= 0")
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


def _positive(flat, *keys):
  for k in keys:
    if not isinstance(flat[k], int) or flat[k] < 1:
      raise ConfigError(f"{k}={flat[k]!r} must be a positive integer")


def fail(e: Exception) -> None:
  """Prints a config error as one line and exits with status 2."""
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)
