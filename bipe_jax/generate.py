"""bipe-generate: continue a prompt with a trained model, streaming the text.

    bipe-generate --workdir=runs/quickstart --prompt="def main(" [--max_new_tokens=128]
        [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0] [--stop_ids=13,...]
        [--hf_checkpoint=RELEASE_DIR] [--step=N] [--mesh=data=2,tensor=4]
        [--config.KEY=VALUE ...]

Restores the latest (or --step) checkpoint of a bipe-train work dir, or an
authors' release directory (--hf_checkpoint; --workdir is then not needed).
The prompt is encoded as a document (BOS first) and decoded with the KV cache
(bipe_jax.decode), `--chunk` tokens per device call; text is printed as each
call returns. Generation ends at --max_new_tokens, a --stop_ids token, or BOS
(a new document) unless --stop_at_bos=false. Then prefill and decode tokens/s.
"""
from __future__ import annotations

import os
import sys

from absl import flags
import jax
import numpy as np

from bipe_jax import cli, decode, evaluate
from bipe_jax import config as config_lib
from bipe_jax.data import levels
from bipe_jax.data.tokenizer import Tokenizer
from bipe_jax.interop import release
from bipe_jax.trainer import Trainer

MAX_NEW_TOKENS = 2**30


def load_tokenizer(config, workdir: str):
  """(Tokenizer, separators) of a bipe-train work dir (a positions.LevelSeparators,
  as its pipeline had them), without reading the corpus."""
  path = config.tokenizer.model or os.path.join(
      config.data.cache_dir or os.path.join(workdir, "data"), "tokenizer.model")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the work dir's tokenizer (written by "
                            "bipe-train) is needed; set --config.tokenizer.model=PATH")
  tok = Tokenizer.load(path)
  seg = config.segmentation
  return tok, levels.separators(tok, config.pe.levels, seg.modality, seg.cot_delimiter,
                                seg.separator_ids, seg.level_separator_ids)


def load(workdir: str | None, hf_checkpoint: str | None = None, step: int | None = None,
         mesh: str | None = None, overrides=()):
  """(config, trainer, params, tokenizer, separators) of a work dir or release dir."""
  if hf_checkpoint:
    imported = release.load(hf_checkpoint)
    config = imported.config
  else:
    config = evaluate.load_config(workdir)
  cli.apply_overrides(config, overrides)
  evaluate.choose_mesh(config, mesh)
  config_lib.validate(config)
  if hf_checkpoint:
    tok, seps = release.load_tokenizer(hf_checkpoint)
    trainer = Trainer(config, imported.model_cfg.vocab_size)
    params = jax.device_put(imported.params, trainer.param_sharding)
  else:
    tok, seps = load_tokenizer(config, workdir)
    trainer, state = evaluate.restore_params(config, workdir, tok.vocab_size, step)
    params = state.params
  return config, trainer, params, tok, seps


class TextStream:
  """Prints the decoded text of a growing list of ids, as it grows.

  Holds back a trailing replacement character: a multi-byte character split
  across calls is printed once its last byte arrives.
  """

  def __init__(self, tokenizer, out=None):
    self.tok, self.out, self.ids, self.shown = tokenizer, out, [], 0

  def __call__(self, new_BN) -> None:
    self.ids.extend(int(t) for t in new_BN[0])
    text = self.tok.decode(self.ids).rstrip("\ufffd")
    out = self.out or sys.stdout
    out.write(text[self.shown:])
    out.flush()
    self.shown = max(self.shown, len(text))


def rate(tokens: int, seconds: float) -> str:
  return f"{tokens / seconds:,.1f} tokens/s" if seconds > 0 else "n/a"


def generate(workdir, prompt: str, max_new_tokens: int, sampling: decode.Sampling,
             seed: int = 0, stop_ids=(), stop_at_bos: bool = True, chunk: int = 16,
             hf_checkpoint=None, step=None, mesh=None, overrides=()) -> decode.Output:
  """Prints the prompt and its continuation as it is produced, then the rates."""
  config, trainer, params, tok, seps = load(workdir, hf_checkpoint, step, mesh, overrides)
  ids = np.concatenate([[tok.bos_id], tok.encode(prompt)]).astype(np.int32)
  stops = list(stop_ids) + ([tok.bos_id] if stop_at_bos else [])
  bad = [t for t in stops if not 0 <= t < tok.vocab_size]
  if bad:
    raise config_lib.ConfigError(f"--stop_ids {bad} lie outside the vocabulary "
                                 f"[0, {tok.vocab_size})")
  gen = decode.Generator.for_trainer(trainer, tok, seps)
  print(prompt, end="", flush=True)
  try:
    out = gen(params, [ids], max_new_tokens, sampling, seed, stops, chunk, TextStream(tok))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print()
    raise config_lib.ConfigError(
        f"--max_new_tokens={max_new_tokens}: the KV cache for the prompt's {len(ids)} tokens "
        f"plus {max_new_tokens} new ones does not fit in memory ({str(e).splitlines()[0]}); "
        "ask for fewer tokens or a shorter --prompt") from None
  print()
  print(f"prefill: {out.prefill_tokens} tokens in {out.prefill_seconds:.3f}s "
        f"({rate(out.prefill_tokens, out.prefill_seconds)}); decode: {out.decode_tokens} "
        f"tokens in {out.decode_seconds:.3f}s ({rate(out.decode_tokens, out.decode_seconds)}); "
        f"compile {out.compile_seconds:.1f}s; KV cache {out.cache.nbytes() / 2**20:.2f} MiB "
        f"(pe.kind={config.pe.kind})", flush=True)
  return out


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A work dir written by bipe-train.")
  flags.DEFINE_string("hf_checkpoint", None, "Generate with an authors' release directory "
                      "(config.json, model.safetensors, tokenizer.model) instead.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("prompt", None, "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens whose "
                     "probability reaches p (1: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_list("stop_ids", [], "Token ids that end generation.")
  flags.DEFINE_boolean("stop_at_bos", True, "End generation where the model starts a new "
                       "document (BOS).")
  flags.DEFINE_integer("chunk", 16, "Tokens per device call: text appears in pieces this long.")
  flags.DEFINE_string("mesh", None, "Mesh, e.g. data=2,tensor=4 (default: the training "
                      "mesh if it fits the devices here, else all along data).")


def main(overrides) -> None:
  f = flags.FLAGS
  if not f.hf_checkpoint:
    cli.required("--workdir=runs/quickstart --prompt='def main('", workdir=f.workdir)
  cli.required("--prompt='def main('", prompt=f.prompt)
  for name in ("max_new_tokens", "chunk"):
    if f[name].value < 1:
      raise config_lib.ConfigError(f"--{name}={f[name].value} must be >= 1")
  if f.max_new_tokens > MAX_NEW_TOKENS:  # the cache's slots are int32
    raise config_lib.ConfigError(f"--max_new_tokens={f.max_new_tokens} must be at most "
                                 f"{MAX_NEW_TOKENS}")
  if f.step is not None and f.step < 0:
    raise config_lib.ConfigError(f"--step={f.step} must be a saved step (>= 0)")
  if not -2**63 <= f.seed < 2**63:  # what jax.random.key takes
    raise config_lib.ConfigError(f"--seed={f.seed} must be a 64-bit integer, e.g. --seed=1")
  try:
    stop_ids = tuple(int(x) for x in f.stop_ids)
  except ValueError:
    raise config_lib.ConfigError(f"--stop_ids={','.join(f.stop_ids)!r} must be token ids "
                                 "(integers), e.g. --stop_ids=13,2") from None
  try:
    sampling = decode.Sampling(f.temperature, f.top_k, f.top_p)
  except ValueError as e:
    raise config_lib.ConfigError(f"--{e}") from None
  generate(f.workdir, f.prompt, f.max_new_tokens, sampling, f.seed, stop_ids, f.stop_at_bos,
           f.chunk, f.hf_checkpoint, f.step, f.mesh, overrides)


def run(argv=None) -> None:
  """Console entry point `bipe-generate`."""
  cli.run(main, define_flags, argv)


if __name__ == "__main__":
  run()
