"""Cached-decoding throughput of a config on this machine: prefill and decode tokens/s.

For each config, a fresh subprocess builds the trainer (random weights), left-
pads `--batch` random prompts of `--prompt_len` tokens (a separator about every
13 tokens), compiles prefill and the decoding loop once, then times
`--repeats` greedy generations of `--new` tokens and reports the best prefill
and decode rates, the KV cache's bytes and the process's peak resident memory.

  python benchmarks/decode.py                                   # quickstart and 151M
  python benchmarks/decode.py --configs configs/bipe_alibi_151m.py --prompt_len 4096
  python benchmarks/decode.py --quick                           # a small check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from timing import run_json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = ("configs/quickstart.py", "configs/bipe_rope_151m.py")


def measure(args) -> dict:
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from bipe_jax import config as config_lib
  from bipe_jax import decode, positions
  from bipe_jax.trainer import Trainer
  c = config_lib.load_file(os.path.join(REPO, args.config))
  if args.quick:
    c.model.d_model, c.model.n_layers, c.model.d_ff = 64, 2, 128
    c.model.n_heads = c.model.n_kv_heads = 4
  config_lib.validate(c)
  vocab = int(c.tokenizer.vocab_size)
  trainer = Trainer(c, vocab_size=vocab)
  params = trainer.init(jax.random.key(0)).params
  rng = np.random.default_rng(0)
  table = np.zeros(vocab, bool)
  table[rng.choice(vocab, max(1, vocab // 13), replace=False)] = True
  rule = positions.PositionRule(table, int(c.pe.max_intra), 1, c.data.packing != "windows")
  gen = decode.Generator(trainer.model, rule, trainer.mesh, trainer.rules)
  prompts = [rng.integers(2, vocab, args.prompt_len) for _ in range(args.batch)]
  runs = [gen(params, prompts, args.new) for _ in range(args.repeats + 1)]
  best_pre = min(r.prefill_seconds for r in runs[1:])
  best_dec = min(r.decode_seconds for r in runs[1:])
  out = runs[-1]
  return dict(config=os.path.basename(args.config), pe_kind=c.pe.kind, batch=args.batch,
              prompt_len=args.prompt_len, new=args.new,
              params=int(sum(x.size for x in jax.tree.leaves(params))),
              compile_s=runs[0].compile_seconds,
              prefill_tokens_per_s=out.prefill_tokens / best_pre,
              decode_tokens_per_s=out.decode_tokens / best_dec,
              kv_cache_bytes=int(out.cache.nbytes()),
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="+", default=list(CONFIGS))
  p.add_argument("--prompt_len", type=int, default=1024)
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="a small model, short prompt, 1 repeat")
  p.add_argument("--config", help=argparse.SUPPRESS)   # one measurement, in this process
  args = p.parse_args(argv)
  if args.quick:
    args.prompt_len, args.new, args.repeats = 32, 8, 1
  if args.config:
    print(json.dumps(measure(args)))
    return
  print(f"{'config':<22} {'kind':<11} {'prompt':>7} {'new':>5} {'prefill tok/s':>14} "
        f"{'decode tok/s':>13} {'KV cache MiB':>13} {'peak RSS MB':>12}")
  for config in args.configs:
    cmd = [sys.executable, os.path.abspath(__file__), "--config", config,
           "--prompt_len", str(args.prompt_len), "--new", str(args.new),
           "--batch", str(args.batch), "--repeats", str(args.repeats)]
    r = run_json(cmd + (["--quick"] if args.quick else []), dict(os.environ))
    if isinstance(r, str):
      print(f"{config:<22} failed: {r}")
      continue
    print(f"{r['config']:<22} {r['pe_kind']:<11} {r['prompt_len']:>7} {r['new']:>5} "
          f"{r['prefill_tokens_per_s']:>14,.0f} {r['decode_tokens_per_s']:>13,.1f} "
          f"{r['kv_cache_bytes'] / 2**20:>13.2f} {r['peak_rss_mb']:>12,.0f}")


if __name__ == "__main__":
  main()
