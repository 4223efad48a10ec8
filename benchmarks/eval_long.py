"""Long-context evaluation cost of the 151M BiPE models on this machine.

For each encoding and length, a fresh subprocess builds the paper's 151M
decoder (random weights), jits one evaluation forward pass (logits, then the
mean next-token NLL), runs it once to compile, then times `--repeats` runs.
It reports tokens/s (length / best run time) and the process's peak resident
memory (max RSS, which includes parameters, compilation and XLA buffers).

  python benchmarks/eval_long.py                       # 1024..32768, both kinds
  python benchmarks/eval_long.py --lengths 8192 --kinds bipe_alibi --impl chunked
  python benchmarks/eval_long.py --xla_flags=''          # XLA's default CPU fusions
  python benchmarks/eval_long.py --lengths 1024 8192 --baseline 8192   # + release, ratios
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from timing import run_json

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
# XLA:CPU (jax 0.10.2) by default hands whole subgraphs to YNNPACK; for this
# model one such fusion spans the last layer's output projection, MLP, final
# norm and LM head, and its internal buffers, outside XLA's own accounting,
# add about the size of the [L, V] logits to the peak (1 GB at 8192 tokens).
# Keeping YNNPACK to single dots removes that at no measured speed cost.
YNN_DOTS_ONLY = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
KINDS = ("bipe_rope", "bipe_alibi")
MEAN_SEGMENT = 13   # tokens per line of code (BIPE_METHOD section 5)


def _batch(length: int, seed: int = 0):
  """Random tokens with a separator about every MEAN_SEGMENT tokens, one document."""
  import numpy as np
  from bipe_jax import positions
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 32000, (1, length), dtype=np.int32)
  sep = rng.random((1, length)) < 1.0 / MEAN_SEGMENT
  intra, inter = positions.bilevel_ids(tokens, sep, max_intra=1024, per_token=True)
  return dict(tokens=tokens, intra=intra, inter=inter,
              positions=np.arange(length, dtype=np.int32)[None],
              doc_ids=np.zeros((1, length), np.int32))


def mean_nll(logits_BLV, targets_BL, rows: int = 1024):
  """Mean next-token NLL, `rows` positions at a time.

  logsumexp over the whole [B, L, V] logits makes XLA:CPU materialise
  exp(logits - max), a second array as large as the logits (1 GB at 8192
  tokens); slicing rows keeps that temporary at [B, rows, V].
  """
  import jax
  import jax.numpy as jnp
  b, length, _ = logits_BLV.shape
  rows = rows if length % rows == 0 else length

  def chunk(i):
    x_BRV = jax.lax.dynamic_slice_in_dim(logits_BLV, i * rows, rows, axis=1)
    t_BR = jax.lax.dynamic_slice_in_dim(targets_BL, i * rows, rows, axis=1)
    target_BR = jnp.take_along_axis(x_BRV, t_BR[..., None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(x_BRV, axis=-1) - target_BR)

  return jnp.sum(jax.lax.map(chunk, jnp.arange(length // rows))) / (b * length)


def measure(kind: str, length: int, impl: str, repeats: int) -> dict:
  """Runs in a fresh process: compile + timed evaluation passes, peak RSS."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bipe_jax import attention, encodings
  from bipe_jax.model import Decoder, ModelConfig

  cfg = ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                    d_ff=3072, pe_kind=kind, max_intra=1024, attention_impl=impl)
  model = Decoder(cfg)
  # Random weights leaf by leaf (normal, std 0.02) from the abstract parameter
  # tree: jitting model.init would briefly hold every initialiser's
  # temporaries (about 3x the 0.6 GB of parameters) and dominate the peak.
  small = jax.tree.map(jnp.asarray, _batch(16))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), small)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * np.float32(0.02)), shapes)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  @jax.jit
  def evaluate(params, batch):
    logits_BLV = model.apply(params, batch)
    return mean_nll(logits_BLV, jnp.roll(batch["tokens"], -1, axis=1))

  batch = jax.tree.map(jnp.asarray, _batch(length))
  t0 = time.perf_counter()
  loss = float(evaluate(params, batch))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(evaluate(params, batch))
    times.append(time.perf_counter() - t0)
  resolved = attention.resolve(impl, kind=encodings.get(kind).bias_kind, dtype=jnp.float32,
                               scores=(1, cfg.n_heads, length, length))
  return dict(kind=kind, length=length, impl=impl, resolved=resolved, params_m=n_params / 1e6,
              loss=loss, first_call_s=first, best_s=min(times), tokens_per_s=length / min(times),
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              peak_device_gb=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
              / 2**30, load_avg=os.getloadavg()[0])


def _row(kind, length, r) -> str:
  if isinstance(r, str):
    return f"{kind:<11} {length:>6} {r}"
  return (f"{kind:<11} {length:>6} {r['resolved']:>9} {r['tokens_per_s']:>9.1f} "
          f"{r['peak_rss_gb']:>11.2f} {r['best_s']:>7.2f} {r['first_call_s']:>10.1f} "
          f"{r['load_avg']:>5.1f} {r.get('peak_device_gb') or 0:>9.2f}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
  ap.add_argument("--kinds", nargs="+", default=list(KINDS))
  ap.add_argument("--impl", default="auto", help="attention.impl (auto | reference | dense | chunked)")
  ap.add_argument("--repeats", type=int, default=2, help="timed runs after the compile run")
  ap.add_argument("--xla_flags", default=YNN_DOTS_ONLY,
                  help="XLA_FLAGS for the measuring processes ('' = XLA defaults); default: "
                       "YNNPACK for single dots only (see YNN_DOTS_ONLY)")
  ap.add_argument("--baseline", type=int, default=0, metavar="MAX_LENGTH",
                  help="also measure the release's PyTorch eager pass (benchmarks/release_torch.py, "
                       "needs torch) at every length up to MAX_LENGTH and print ratios")
  ap.add_argument("--out", help="append every result as a JSON line to this file")
  ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.kinds[0], args.lengths[0], args.impl, args.repeats)))
    return
  env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                          args.xla_flags])))
  print(f"XLA_FLAGS={env['XLA_FLAGS']!r}; {os.cpu_count()} CPUs", flush=True)
  print(f"{'encoding':<11} {'length':>6} {'impl':>9} {'tokens/s':>9} {'peak RSS GB':>11} "
        f"{'best s':>7} {'1st call s':>10} {'load':>5} {'device GB':>9}", flush=True)
  here = os.path.dirname(os.path.abspath(__file__))
  pairs = []
  for kind in args.kinds:
    for length in args.lengths:
      repeats = args.repeats if length < 16384 else 1   # a 32k pass takes minutes
      ours = run_json([sys.executable, __file__, "--one", "--kinds", kind, "--lengths", str(length),
                   "--impl", args.impl, "--repeats", str(repeats)], env)
      print(_row(kind, length, ours), flush=True)
      base = None
      if length <= args.baseline:
        base = run_json([sys.executable, os.path.join(here, "release_torch.py"), "--kind", kind,
                     "--length", str(length), "--repeats", str(repeats)], env)
        print(_row(kind, length, base), flush=True)
      pairs.append((kind, length, ours, base))
      if args.out:
        with open(args.out, "a") as f:
          for r in (ours, base):
            if isinstance(r, dict):
              f.write(json.dumps(r) + "\n")
  done = [(k, n, o, b) for k, n, o, b in pairs if isinstance(o, dict) and isinstance(b, dict)]
  if done:
    print("\nagainst the release's PyTorch eager pass, same machine, same run:")
    print(f"{'encoding':<11} {'length':>6} {'tokens/s x':>10} {'peak RSS /':>10}")
    for kind, length, o, b in done:
      print(f"{kind:<11} {length:>6} {o['tokens_per_s'] / b['tokens_per_s']:>10.2f} "
            f"{b['peak_rss_gb'] / o['peak_rss_gb']:>10.2f}")


if __name__ == "__main__":
  main()
