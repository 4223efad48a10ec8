"""Training-step throughput of a 151M config on this machine, against the release's.

Builds the trainer of a config (default configs/bipe_rope_151m.py, the paper's
model) with `--batch` rows of `--seq_len` tokens, random tokens with a
separator about every 13 tokens, jits the full step (forward, backward,
clipping, AdamW; state donated), runs it once to compile, then times
`--steps` steps and reports tokens/s (best step) and the peak resident memory.
With --baseline, benchmarks/release_torch.py --train measures the release's
PyTorch eager step on the same shapes in a fresh process, and the ratio is
printed. Runs in subprocesses so each figure has its own process's peak.

  python benchmarks/train_step.py --baseline
  python benchmarks/train_step.py --config configs/bipe_alibi_151m.py --set train.remat=dots
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from eval_long import YNN_DOTS_ONLY   # and why it is set
from timing import best_seconds, run_json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _config(path: str, overrides: list[str], batch: int, seq_len: int):
  """The config file (as --config= loads it) with `KEY=VALUE` overrides, validated."""
  sys.path.insert(0, REPO)
  from bipe_jax import config as config_lib
  c = config_lib.load_file(path)
  c.train.batch_size, c.data.seq_len = batch, seq_len
  flat = config_lib.flat_keys(c)
  for item in overrides:
    key, value = item.split("=", 1)
    if key not in flat:
      sys.exit(f"--set {item}: unknown config key {key!r}")
    old = flat[key]
    typed = value == "True" if isinstance(old, bool) else type(old)(value)
    c.update_from_flattened_dict({key: typed})
  config_lib.validate(c)
  return c


def measure(args) -> dict:
  import jax
  import numpy as np
  from bipe_jax import positions
  from bipe_jax.trainer import Trainer
  c = _config(args.config, args.set, args.batch, args.seq_len)
  trainer = Trainer(c, vocab_size=c.tokenizer.vocab_size)
  state = trainer.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, c.tokenizer.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
  sep = rng.random(tokens.shape) < 1.0 / 13
  intra, inter = positions.bilevel_ids(tokens[:, :-1], sep[:, :-1], max_intra=c.pe.max_intra,
                                       per_token=True)
  n = args.seq_len
  batch = trainer.global_batch(dict(
      tokens=tokens[:, :-1], targets=tokens[:, 1:], intra=intra, inter=inter,
      positions=np.tile(np.arange(n, dtype=np.int32), (args.batch, 1)),
      doc_ids=np.zeros((args.batch, n), np.int32), loss_mask=np.ones((args.batch, n), np.float32)))
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = trainer.step(state, batch, key)
  loss = float(m["loss"])
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = trainer.step(state, batch, key)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(config=os.path.basename(args.config), overrides=args.set, batch=args.batch,
              seq_len=n, loss=loss, first_call_s=first, best_s=min(times),
              tokens_per_s=args.batch * n / min(times),
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              load_avg=os.getloadavg()[0], pe_kind=c.pe.kind, params_m=n_params / 1e6,
              matmul_gflops=_matmul_gflops(args.seq_len * args.batch, c.model.d_model,
                                           c.model.d_ff))


def _matmul_gflops(rows: int, d: int, f: int) -> float:
  """float32 GFLOP/s of a jitted [rows, d] x [d, f] matmul (the MLP's shape), best of 5."""
  import jax
  import jax.numpy as jnp
  a, b = jnp.ones((rows, d), jnp.float32), jnp.ones((d, f), jnp.float32)
  return 2 * rows * d * f / best_seconds(jax.jit(jnp.dot), a, b, repeats=5) / 1e9


def _run(cmd, env) -> dict:
  r = run_json(cmd, env)
  if isinstance(r, str):
    sys.exit(f"measurement {r}")
  return r


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=os.path.join(REPO, "configs", "bipe_rope_151m.py"))
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                  help="config overrides, e.g. train.remat=dots model.dtype=bfloat16")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  ap.add_argument("--baseline", action="store_true",
                  help="also time the release's PyTorch eager step (needs torch)")
  ap.add_argument("--xla_flags", default=YNN_DOTS_ONLY, help="XLA_FLAGS ('' = XLA defaults)")
  ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args)))
    return
  env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                          args.xla_flags])))
  print(f"XLA_FLAGS={env['XLA_FLAGS']!r}; {os.cpu_count()} CPUs; batch {args.batch} x "
        f"{args.seq_len} tokens", flush=True)
  print(f"{'what':<34} {'tokens/s':>9} {'peak RSS GB':>11} {'best s':>7} {'1st s':>6} "
        f"{'loss':>7} {'load':>5}", flush=True)
  row = lambda name, r: (f"{name:<34} {r['tokens_per_s']:>9.1f} {r['peak_rss_gb']:>11.2f} "
                         f"{r['best_s']:>7.2f} {r['first_call_s']:>6.1f} {r['loss']:>7.3f} "
                         f"{r['load_avg']:>5.1f}")
  ours = _run([sys.executable, __file__, "--one", *sys.argv[1:]] if argv is None else
              [sys.executable, __file__, "--one", *argv], env)
  print(row(f"bipe_jax {ours['config']} {' '.join(args.set)}".strip(), ours), flush=True)
  need = 6 * ours["params_m"] * 1e6 * args.batch * args.seq_len / (ours["matmul_gflops"] * 1e9)
  print(f"  {ours['params_m']:.1f}M parameters: 6 x params x tokens = "
        f"{6 * ours['params_m'] * 1e6 * args.batch * args.seq_len / 1e12:.2f} TFLOP per step, "
        f"{need:.2f} s at the {ours['matmul_gflops']:.0f} GFLOP/s a float32 matmul of the MLP's "
        f"shape reaches here (step / that: {ours['best_s'] / need:.2f})", flush=True)
  if args.baseline:
    kind = ours["pe_kind"] if ours["pe_kind"] in ("bipe_rope", "bipe_alibi") else "bipe_rope"
    base = _run([sys.executable, os.path.join(HERE, "release_torch.py"), "--train", "--kind", kind,
                 "--length", str(args.seq_len), "--batch", str(args.batch),
                 "--repeats", str(args.steps)], env)
    print(row(f"release {kind} (torch eager)", base), flush=True)
    print(f"tokens/s ratio bipe_jax / release: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}")


if __name__ == "__main__":
  main()
