"""The global norm of a 151M parameter tree: optax.tree.norm against bipe_jax.global_norm.

Random float32 leaves of the shapes of configs/bipe_rope_151m.py's
parameters; both norms jitted, best of --repeats, alternating, in one
process, with the XLA flags the training step runs under. Prints each
time, the ratio and both results against a float64 numpy sum.

  python benchmarks/global_norm.py
  python benchmarks/global_norm.py --config configs/bipe_alibi_151m.py --repeats 9
  python benchmarks/global_norm.py --windows 8,16,32     # + the same with other window widths
"""
from __future__ import annotations

import argparse
import os
import sys

from eval_long import YNN_DOTS_ONLY
from timing import best_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=os.path.join(REPO, "configs", "bipe_rope_151m.py"))
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--windows", default="8",
                  help="comma-separated window widths for bipe_jax.windowed (the first is the "
                       "default, 8)")
  ap.add_argument("--xla_flags", default=YNN_DOTS_ONLY, help="XLA_FLAGS ('' = XLA defaults)")
  args = ap.parse_args(argv)
  os.environ["XLA_FLAGS"] = args.xla_flags
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  import optax
  from bipe_jax import config as config_lib, windowed
  from bipe_jax.global_norm import global_norm
  from bipe_jax.trainer import Trainer

  c = config_lib.load_file(args.config)
  shapes = Trainer(c, vocab_size=c.tokenizer.vocab_size).abstract_state().params
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  tree = jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])
  n = sum(x.size for x in leaves)
  exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  widths = [int(w) for w in args.windows.split(",")]

  def with_window(w):
    def norm(t):   # the width is read while tracing
      kept, windowed.WINDOW = windowed.WINDOW, w
      try:
        return global_norm(t)
      finally:
        windowed.WINDOW = kept
    return jax.jit(norm)

  fns = {"optax.tree.norm": jax.jit(optax.tree.norm)}
  fns.update({f"global_norm, window {w}": with_window(w) for w in widths})
  print(f"{n / 1e6:.1f}M parameters in {len(leaves)} leaves; XLA_FLAGS={args.xla_flags!r}; "
        f"load {os.getloadavg()[0]:.1f}")
  best = {k: float("inf") for k in fns}
  for r in range(args.rounds):
    for name, fn in fns.items():
      s = best_seconds(fn, tree, repeats=args.repeats)
      best[name] = min(best[name], s)
      print(f"round {r + 1}  {name:<24} {1e3 * s:8.1f} ms  {4 * n / s / 1e9:5.1f} GB/s", flush=True)
  for name, fn in fns.items():
    print(f"{name:<24} best {1e3 * best[name]:8.1f} ms  relative error "
          f"{float(fn(tree)) / exact - 1:+.1e}  optax / this: {best['optax.tree.norm'] / best[name]:.1f}x")


if __name__ == "__main__":
  main()
