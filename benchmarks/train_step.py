"""Training-step throughput and MFU of the 151M configs on this machine, against the release's.

For each kind of `--kinds` (config configs/KIND_151m.py), builds the trainer
with `--batch` rows of `--seq_len` tokens (random tokens, a separator about
every 13 tokens), jits the full step (forward, backward, clipping, AdamW;
state donated), runs it once to compile, then times `--steps` steps and
reports tokens/s (best step), the peak resident memory and MFU: model FLOPs
(6 x non-embedding parameters x tokens + 12 x layers x d_model x seq_len x
tokens for attention, PaLM's count) over the rate a float32 matmul of the
MLP's shape reaches in the same process. With --baseline,
benchmarks/release_torch.py --train times the release's PyTorch eager step of
the same kind on the same shapes, right after ours. `--rounds N` repeats the
whole alternation N times. Every figure comes from its own fresh process (its
own peak memory).

  python benchmarks/train_step.py --baseline --rounds 3 --kinds bipe_rope,rope
  python benchmarks/train_step.py --rounds 3 --kinds bipe_rope,bipe_alibi
  python benchmarks/train_step.py --kinds bipe_alibi --set train.remat=dots
  python benchmarks/train_step.py --quick --baseline --kinds bipe_rope,alibi   # checks the script
  python benchmarks/train_step.py --profile /tmp/trace       # + the costliest XLA ops of one step
  python benchmarks/train_step.py --malloc default           # glibc's malloc as it comes
  python benchmarks/train_step.py --baseline --baseline_malloc retain   # the release with our malloc settings

"faults" is the most minor page faults of any timed step (host memory the
step touched for the first time; about 700,000 when malloc had to extend the
heap for the step's 2.8 GB of temporaries, which happens at random steps,
once or twice per process).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from eval_long import YNN_DOTS_ONLY   # and why it is set
from timing import best_seconds, run_json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
KINDS = ("bipe_rope", "bipe_alibi", "rope", "alibi")
# --quick: a tiny model for both sides, to check the script runs.
QUICK_SET = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
             "model.d_ff=128"]
QUICK_DIMS = "d=64,layers=2,heads=2,ff=128"


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


def model_flops(params: dict, c, tokens: int) -> float:
  """6 x non-embedding parameters x tokens + attention (12 x layers x d_model x seq_len x tokens).

  Non-embedding: every parameter but the token table and the absolute or
  intra position tables (lookups, no matmul); the LM head counts.
  """
  import jax
  tables = {"embed", "intra", "absolute"}
  n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
          if getattr(path[0], "key", None) not in tables)
  m = c.model
  return 6 * n * tokens + 12 * m.n_layers * m.d_model * c.data.seq_len * tokens


def _hostmem():
  """bipe_jax.hostmem, imported from this repository (no JAX import)."""
  sys.path.insert(0, REPO)
  from bipe_jax import hostmem
  return hostmem


def setup_in_process() -> None:
  """What a process that times steps itself needs before JAX starts (step_ab.py, paired.py):
  the YNNPACK flag added to XLA_FLAGS, the repository importable, malloc keeping freed memory."""
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), YNN_DOTS_ONLY]))
  _hostmem().retain_freed_memory()


def trainer_and_batch(path: str, overrides: list[str], batch_size: int, seq_len: int):
  """(trainer, initial state, global batch) of the config: random tokens, a separator ~every 13."""
  import jax
  import numpy as np
  from bipe_jax import positions
  from bipe_jax.trainer import Trainer
  c = _config(path, overrides, batch_size, seq_len)
  trainer = Trainer(c, vocab_size=c.tokenizer.vocab_size)
  state = trainer.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, c.tokenizer.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  sep = rng.random(tokens.shape) < 1.0 / 13
  intra, inter = positions.bilevel_ids(tokens[:, :-1], sep[:, :-1], max_intra=c.pe.max_intra,
                                       per_token=True)
  batch = trainer.global_batch(dict(
      tokens=tokens[:, :-1], targets=tokens[:, 1:], intra=intra, inter=inter,
      positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
      doc_ids=np.zeros((batch_size, seq_len), np.int32),
      loss_mask=np.ones((batch_size, seq_len), np.float32)))
  return trainer, state, batch


def measure(args) -> dict:
  sys.path.insert(0, REPO)
  from bipe_jax import hostmem
  if args.malloc == "retain":
    hostmem.retain_freed_memory()   # as bipe-train does, before JAX starts
  import jax
  trainer, state, batch = trainer_and_batch(args.config, args.set, args.batch, args.seq_len)
  c, n = trainer.config, args.seq_len
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = trainer.step(state, batch, key)
  loss = float(m["loss"])
  first = time.perf_counter() - t0
  times, faults = [], []
  for _ in range(args.steps):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    state, m = trainer.step(state, batch, key)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  if args.profile:
    from profile_ops import top_ops
    with jax.profiler.trace(args.profile):
      state, m = trainer.step(state, batch, key)
      jax.block_until_ready(m["loss"])
    print(top_ops(args.profile), file=sys.stderr)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(config=os.path.basename(args.config), overrides=args.set, batch=args.batch,
              seq_len=n, loss=loss, first_call_s=first, best_s=min(times),
              tokens_per_s=args.batch * n / min(times), faults_max_step=max(faults),
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              load_avg=os.getloadavg()[0], pe_kind=c.pe.kind, params_m=n_params / 1e6,
              model_tflop=model_flops(state.params, c, args.batch * n) / 1e12,
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


def _run_profiled(cmd, env) -> dict:
  """Like _run, also printing the op table the measuring process writes to stderr."""
  import subprocess
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    sys.exit(f"measurement FAILED (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
  print(proc.stderr[proc.stderr.find("time ms"):] if "time ms" in proc.stderr else proc.stderr)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(name: str, r: dict) -> str:
  mfu = (f"{100 * r['model_tflop'] * 1e3 / r['best_s'] / r['matmul_gflops']:>5.1f}"
         if "model_tflop" in r else f"{'':>5}")
  return (f"{name:<30} {r['tokens_per_s']:>9.1f} {r['best_s']:>7.2f} {mfu} "
          f"{r['peak_rss_gb']:>11.2f} {r['first_call_s']:>6.1f} {r['loss']:>7.3f} "
          f"{r['load_avg']:>5.1f} {r.get('faults_max_step', ''):>8}")


def _parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--kinds", default="bipe_rope",
                  help=f"comma-separated pe kinds, each from configs/KIND_151m.py "
                       f"({','.join(KINDS)})")
  ap.add_argument("--config", default=None, help="one config file instead of --kinds")
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                  help="config overrides, e.g. train.remat=dots model.dtype=bfloat16")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=5, help="timed steps after the compile step")
  ap.add_argument("--rounds", type=int, default=1,
                  help="repeat the whole alternation (ours, baseline, next kind) this many times")
  ap.add_argument("--baseline", action="store_true",
                  help="also time the release's PyTorch eager step of each kind (needs torch)")
  ap.add_argument("--quick", action="store_true",
                  help="a tiny model (both sides), 128 tokens, 1 step: checks the script only")
  ap.add_argument("--malloc", default="retain", choices=["retain", "default"],
                  help="retain: keep freed host memory as bipe-train does (bipe_jax.hostmem); "
                       "default: glibc's own behaviour")
  ap.add_argument("--baseline_malloc", default="default", choices=["default", "retain"],
                  help="the release's process: glibc's own malloc (as its users run it), or "
                       "retain: the same malloc settings as ours (GLIBC_TUNABLES)")
  ap.add_argument("--profile", metavar="DIR",
                  help="trace one more step into DIR (jax.profiler) and print the costliest ops "
                       "(single kind; stderr)")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="MFU against this peak (e.g. a GPU's dense bf16 TFLOP/s) instead of the "
                       "measured float32 matmul rate")
  ap.add_argument("--xla_flags", default=YNN_DOTS_ONLY, help="XLA_FLAGS ('' = XLA defaults)")
  ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.quick:
    args.set, args.seq_len, args.steps = QUICK_SET + args.set, 128, 1
  kinds = [k for k in args.kinds.split(",") if k]
  bad = [k for k in kinds if k not in KINDS]
  if bad and not args.config:
    ap.error(f"--kinds: unknown {bad}; valid: {','.join(KINDS)}")
  return args, kinds


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args, kinds = _parse(argv)
  if args.one:
    print(json.dumps(measure(args)))
    return
  env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                          args.xla_flags])))
  base_env = env
  if args.baseline_malloc == "retain":
    base_env = dict(env, GLIBC_TUNABLES=_hostmem().GLIBC_TUNABLES)
  peak = f"{args.peak_tflops} TFLOP/s" if args.peak_tflops else "the measured float32 matmul rate"
  print(f"XLA_FLAGS={env['XLA_FLAGS']!r}; {os.cpu_count()} CPUs; batch {args.batch} x "
        f"{args.seq_len} tokens; MFU against {peak}", flush=True)
  print(f"{'round what':<30} {'tokens/s':>9} {'best s':>7} {'MFU %':>5} {'peak RSS GB':>11} "
        f"{'1st s':>6} {'loss':>7} {'load':>5} {'faults':>8}", flush=True)
  configs = ([args.config] if args.config else
             [os.path.join(REPO, "configs", f"{k}_151m.py") for k in kinds])
  ours, ratios = {}, {}
  for rnd in range(1, args.rounds + 1):
    for path in configs:
      cmd = [sys.executable, os.path.abspath(__file__), "--one", "--config", path,
             "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
             "--malloc", args.malloc, "--set", *args.set]
      if args.profile:
        cmd[3:3] = ["--profile", os.path.join(args.profile, os.path.basename(path)[:-3])]
        r = _run_profiled(cmd, env)
      else:
        r = _run(cmd, env)
      if args.peak_tflops:
        r["matmul_gflops"] = args.peak_tflops * 1e3
      kind = r["pe_kind"]
      ours.setdefault(kind, []).append(r)
      print(_row(f"{rnd} bipe_jax {kind}", r), flush=True)
      if args.baseline:
        base = _run([sys.executable, os.path.join(HERE, "release_torch.py"), "--train",
                     "--kind", kind, "--length", str(args.seq_len), "--batch", str(args.batch),
                     "--repeats", str(args.steps)] + (["--dims", QUICK_DIMS] if args.quick else []),
                    base_env)
        print(_row(f"{rnd} release {kind} (torch)", base), flush=True)
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        ratios.setdefault(kind, []).append(ratio)
        print(f"{'':<30} tokens/s bipe_jax / release: {ratio:.2f}", flush=True)
  _summary(ours, ratios)


def _summary(ours: dict, ratios: dict) -> None:
  print("summary (best step per kind over rounds):")
  for kind, rs in ours.items():
    best = min(rs, key=lambda r: r["best_s"])
    mfu = 100 * best["model_tflop"] * 1e3 / best["best_s"] / best["matmul_gflops"]
    line = (f"  {kind:<11} {best['tokens_per_s']:.1f} tokens/s, step {best['best_s']:.2f} s, "
            f"{best['model_tflop']:.2f} model TFLOP per step, peak {best['matmul_gflops']:.0f} "
            f"GFLOP/s, MFU {mfu:.1f}%")
    if kind in ratios:
      line += (f"; vs release per round: {', '.join(f'{x:.2f}' for x in ratios[kind])} "
               f"(min {min(ratios[kind]):.2f}, median {statistics.median(ratios[kind]):.2f})")
    print(line)
  if "bipe_rope" in ours and "bipe_alibi" in ours:
    per_round = [a["best_s"] / r["best_s"] for a, r in zip(ours["bipe_alibi"], ours["bipe_rope"])]
    print(f"  bipe_alibi / bipe_rope step time per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}")


if __name__ == "__main__":
  main()
