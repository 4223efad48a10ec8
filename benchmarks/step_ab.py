"""Two variants of the 151M training step in one process, alternating step by step.

Separate processes move this CPU's step time by about +-8% (heap layout,
the machine's other load); a change worth a few percent only shows when
both variants run in the same process, one step each in turn, so both see
the same conditions. Variant A and B are the config file with their own
`--a_set` / `--b_set` overrides; `--a_plain_reductions` builds A with plain
last-axis reductions instead of bipe_jax.windowed's (the global norm and the
dense kernel's softmax as they were before); `--a_xla` / `--b_xla` compile
a variant with XLA compiler options (debug options such as
xla_cpu_scheduler_type, for this compile only). Prints every pair of steps
and each variant's best and median (the order alternates AB, BA, ...).

  python benchmarks/step_ab.py --a_plain_reductions --steps 12
  python benchmarks/step_ab.py --a_set attention.impl=chunked --steps 12
  python benchmarks/step_ab.py --kind bipe_alibi --a_set attention.block_k=256
  python benchmarks/step_ab.py --b_xla xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED
  python benchmarks/step_ab.py --quick --a_plain_reductions      # checks the script
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

from train_step import KINDS, QUICK_SET, REPO, setup_in_process, trainer_and_batch


@contextlib.contextmanager
def plain_reductions():
  """bipe_jax.windowed.reduce_last_axis as one plain reduction, while a variant is traced."""
  import jax.numpy as jnp
  from bipe_jax import windowed
  kept = windowed.reduce_last_axis
  windowed.reduce_last_axis = lambda y, op=jnp.sum, keepdims=False: op(y, axis=-1,
                                                                        keepdims=keepdims)
  try:
    yield
  finally:
    windowed.reduce_last_axis = kept


def _options(ap, pairs: list[str]) -> dict:
  """OPTION=VALUE strings -> XLA compiler options; true/false become booleans."""
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key.startswith("xla_"):
      ap.error(f"XLA option {pair!r}: write it as xla_NAME=VALUE, e.g. "
               "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    out[key] = {"true": True, "false": False}.get(value.lower(), value)
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--kind", default="bipe_rope", choices=KINDS, help="configs/KIND_151m.py")
  ap.add_argument("--a_set", nargs="*", default=[], metavar="KEY=VALUE")
  ap.add_argument("--b_set", nargs="*", default=[], metavar="KEY=VALUE")
  ap.add_argument("--a_plain_reductions", action="store_true")
  ap.add_argument("--a_xla", nargs="*", default=[], metavar="OPTION=VALUE",
                  help="XLA compiler options for A's compile (true/false for booleans)")
  ap.add_argument("--b_xla", nargs="*", default=[], metavar="OPTION=VALUE")
  ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--quick", action="store_true",
                  help="a tiny model, 128 tokens, 2 steps: checks the script only")
  args = ap.parse_args(argv)
  if not (args.a_set or args.b_set or args.a_plain_reductions or args.a_xla or args.b_xla):
    ap.error("A and B are the same step: give --a_set, --b_set, --a_xla, --b_xla or "
             "--a_plain_reductions")
  options = {"A": _options(ap, args.a_xla), "B": _options(ap, args.b_xla)}
  if args.quick:
    args.a_set, args.b_set = QUICK_SET + args.a_set, QUICK_SET + args.b_set
    args.seq_len, args.steps = 128, 2
  setup_in_process()
  import jax

  config = os.path.join(REPO, "configs", f"{args.kind}_151m.py")
  runs = {}
  for name, overrides, plain in (("A", args.a_set, args.a_plain_reductions), ("B", args.b_set, False)):
    with plain_reductions() if plain else contextlib.nullcontext():
      trainer, state, batch = trainer_and_batch(config, overrides, args.batch, args.seq_len)
      t0 = time.perf_counter()
      # Compiles while patched.
      step = trainer.compiled_step(state, batch, jax.random.key(1), options[name] or None)
      state, m = step(state, batch, jax.random.key(1))
      xla = " ".join(f"{k}={v}" for k, v in options[name].items())
      print(f"{name}: {' '.join(overrides) or '(config as is)'}"
            f"{' + plain reductions' if plain else ''}{' + XLA ' + xla if xla else ''}; "
            f"compile+first step {time.perf_counter() - t0:.1f} s, loss {float(m['loss']):.4f}",
            flush=True)
    runs[name] = [step, state, batch, []]
  for i in range(args.steps):
    for name in ("AB" if i % 2 == 0 else "BA"):
      step, state, batch, times = runs[name]
      t0 = time.perf_counter()
      state, m = step(state, batch, jax.random.key(1))
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
      runs[name][1] = state
    print(f"step {i + 1:>3}  A {runs['A'][3][-1]:6.2f} s  B {runs['B'][3][-1]:6.2f} s  "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
  tokens = args.batch * args.seq_len
  for name in "AB":
    t = runs[name][3]
    print(f"{name}: best {min(t):.3f} s ({tokens / min(t):.1f} tokens/s), "
          f"median {statistics.median(t):.3f} s ({tokens / statistics.median(t):.1f} tokens/s)")
  a, b = (statistics.median(runs[n][3]) for n in "AB")
  print(f"median step time A / B: {a / b:.3f}")


if __name__ == "__main__":
  main()
