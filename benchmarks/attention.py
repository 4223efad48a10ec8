"""Time and memory of every attention implementation runnable here, against `reference`.

For each length: forward (or forward+backward with --grad) of each kernel on
random q/k/v with BiPE-ALiBi positions (a separator every ~13 tokens) or no
bias, jitted, best of --repeats after a compile run. Memory is XLA's own
account of the compiled program (temporaries + arguments + outputs), the same
on every backend; on GPU/TPU the device's peak bytes in use is shown too.
Ratios are against the dense reference at the same length (n/a where the
reference would need more than --max_reference_gb for its [B, H, L, L] scores).

  python benchmarks/attention.py                                   # CPU: reference, dense, chunked
  python benchmarks/attention.py --grad --lengths 1024 2048 --bias none
  python benchmarks/attention.py --batch 8 --dtype bfloat16 --grad  # GPU: + pallas, cudnn
  python benchmarks/attention.py --grad --impls pallas cudnn --bias none   # only these
  python benchmarks/attention.py --interpret --lengths 256          # + Pallas interpreted (slow)
  python benchmarks/attention.py --grad --blocks 256x512 512x256    # + other block sizes
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bipe_jax import encodings
from bipe_jax.attention import Bias, dispatch
from timing import best_seconds


def inputs(batch, length, heads, kv_heads, head_dim, dtype, bias_kind, seed=0):
  rng = np.random.default_rng(seed)
  qkv = [jnp.asarray(rng.standard_normal((batch, length, n, head_dim), np.float32), dtype)
         for n in (heads, kv_heads, kv_heads)]
  doc = jnp.zeros((batch, length), jnp.int32)
  inter = np.cumsum(rng.random((batch, length)) < 1 / 13, axis=1).astype(np.float32)
  bias = None
  if bias_kind == "alibi":
    pos = jnp.asarray(inter)
    bias = Bias(jnp.asarray(encodings.alibi_slopes(heads, 96.0)), pos, pos)
  return qkv, dict(q_doc_BT=doc, k_doc_BS=doc, bias=bias)


def candidates(backend: str, bias_kind: str, dtype, interpret: bool, blocks=()) -> dict:
  """name -> kernel for every implementation that can run this case here.

  `blocks`: extra (block_q, block_k) pairs for the blockwise kernels (chunked, pallas).
  """
  kind = "alibi" if bias_kind == "alibi" else "none"
  out = {name: dispatch.kernel_fn(name, backend) for name in dispatch.valid_impls(backend, kind, dtype)}
  for name in [n for n in out if n in ("chunked", "pallas")]:
    for bq, bk in blocks:
      out[f"{name} {bq}x{bk}"] = functools.partial(out[name], block_q=bq, block_k=bk)
  if interpret and backend == "cpu":
    from bipe_jax.attention import pallas_gpu, pallas_tpu
    out["pallas_tpu (interpret)"] = functools.partial(pallas_tpu.attention, interpret=True,
                                                      block_q=128, block_k=128)
    out["pallas_gpu (interpret)"] = functools.partial(pallas_gpu.attention, interpret=True)
  return out


def flops(batch, length, heads, head_dim, grad: bool) -> float:
  """Causal attention matmul FLOPs: 2 matmuls of 2*L*L*D per head, half the tiles."""
  fwd = 4 * batch * heads * length * length * head_dim / 2
  return fwd * (3.5 if grad else 1.0)   # backward: 5 matmuls vs 2


def run_one(fn, args, kw, grad: bool, repeats: int):
  """(best seconds, XLA bytes, device peak bytes or None)."""
  if grad:
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) ** 2)
    step = jax.jit(jax.grad(loss, (0, 1, 2)))
  else:
    step = jax.jit(lambda q, k, v: fn(q, k, v, **kw))
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  xla_bytes = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  best = best_seconds(compiled, *args, repeats=repeats)
  stats = jax.devices()[0].memory_stats() or {}
  return best, xla_bytes, stats.get("peak_bytes_in_use")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--kv_heads", type=int, default=12)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--bias", default="alibi", choices=["alibi", "none"])
  ap.add_argument("--grad", action="store_true", help="time forward+backward")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--max_reference_gb", type=float, default=4.0)
  ap.add_argument("--interpret", action="store_true", help="also Pallas kernels interpreted on CPU")
  ap.add_argument("--impls", nargs="*", default=[],
                  help="only these implementations (e.g. pallas cudnn); default all that run here")
  ap.add_argument("--blocks", nargs="*", default=[], metavar="QxK",
                  help="also run the blockwise kernels with these block sizes, e.g. 256x512")
  args = ap.parse_args(argv)
  blocks = [tuple(int(n) for n in b.split("x")) for b in args.blocks]
  backend = dispatch._backend(None)
  dtype = jnp.dtype(args.dtype)
  print(f"backend {backend} ({jax.devices()[0].device_kind}), batch {args.batch}, heads "
        f"{args.heads}/{args.kv_heads}, head dim {args.head_dim}, {dtype.name}, bias {args.bias}, "
        f"{'forward+backward' if args.grad else 'forward'}")
  print(f"{'length':>6} {'impl':<24} {'ms':>9} {'TFLOP/s':>8} {'XLA MB':>9} {'peak MB':>8} "
        f"{'time/ref':>8} {'mem/ref':>8}", flush=True)
  for length in args.lengths:
    qkv, kw = inputs(args.batch, length, args.heads, args.kv_heads, args.head_dim, dtype, args.bias)
    ref_gb = args.batch * args.heads * length * length * 4 * (3 if args.grad else 2) / 2**30
    ref = None
    for name, fn in candidates(backend, args.bias, dtype, args.interpret, blocks).items():
      if args.impls and name.split()[0] not in args.impls:
        continue
      if name in ("reference", "dense") and ref_gb > args.max_reference_gb:
        print(f"{length:>6} {name:<24} skipped: needs ~{ref_gb:.1f} GB of scores", flush=True)
        continue
      try:
        best, xla_bytes, peak = run_one(fn, qkv, kw, args.grad, args.repeats)
      except Exception as e:  # a kernel that cannot run this shape here: say why, go on
        print(f"{length:>6} {name:<24} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        continue
      if name == "reference":
        ref = (best, xla_bytes)
      tflops = flops(args.batch, length, args.heads, args.head_dim, args.grad) / best / 1e12
      ratio = (f"{best / ref[0]:>8.2f} {xla_bytes / ref[1]:>8.3f}" if ref and name != "reference"
               else f"{'1.00' if name == 'reference' else 'n/a':>8} "
                    f"{'1.000' if name == 'reference' else 'n/a':>8}")
      peak_mb = f"{peak / 2**20:>8.0f}" if peak else f"{'-':>8}"
      print(f"{length:>6} {name:<24} {best * 1e3:>9.1f} {tflops:>8.3f} {xla_bytes / 2**20:>9.1f} "
            f"{peak_mb} {ratio}", flush=True)


if __name__ == "__main__":
  main()
