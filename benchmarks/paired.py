"""bipe_jax's 151M training step and the release's, in one process, one step each in turn.

train_step.py --baseline measures each side in its own fresh process, and
processes on this CPU differ by about +-10% on each side, so a single
round's ratio can land anywhere in a +-20% band. Here both steps run in
the same process, alternating (ours, release, release, ours, ...), so both
see the same machine minute by minute; each pair gives one ratio of step
times. malloc keeps freed memory (bipe_jax/hostmem.py) for both, as it is
process-wide: the release's PyTorch step then faults fewer pages than in a
process of its own, which makes its side faster, not slower.

  python benchmarks/paired.py --kind bipe_rope --pairs 8
  python benchmarks/paired.py --quick                    # checks the script on a tiny model
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from train_step import KINDS, QUICK_DIMS, QUICK_SET, REPO, setup_in_process, trainer_and_batch


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--kind", default="bipe_rope", choices=KINDS, help="configs/KIND_151m.py")
  ap.add_argument("--pairs", type=int, default=8, help="timed steps per side")
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--quick", action="store_true",
                  help="a tiny model, 128 tokens, 2 pairs: checks the script only")
  args = ap.parse_args(argv)
  overrides = []
  if args.quick:
    overrides, args.seq_len, args.pairs = QUICK_SET, 128, 2
  setup_in_process()
  import jax
  try:
    import release_torch
  except ImportError as e:
    sys.exit(f"error: the release's side needs PyTorch ({e}); pip install torch")

  trainer, state, batch = trainer_and_batch(os.path.join(REPO, "configs", f"{args.kind}_151m.py"),
                                            overrides, 1, args.seq_len)
  key = jax.random.key(1)

  def ours():
    nonlocal state
    state, m = trainer.step(state, batch, key)
    return jax.block_until_ready(m["loss"])

  dims = release_torch.parse_dims(QUICK_DIMS) if args.quick else None
  theirs = release_torch.train_step(args.kind, args.seq_len, 1, dims)
  t0 = time.perf_counter()
  loss_ours = float(ours())
  loss_theirs = float(theirs())
  print(f"{args.kind}, 1 x {args.seq_len} tokens; first steps (ours compiles) "
        f"{time.perf_counter() - t0:.1f} s; loss ours {loss_ours:.4f}, release {loss_theirs:.4f}",
        flush=True)
  times = {"ours": [], "release": []}
  for i in range(args.pairs):
    for name in (("ours", "release") if i % 2 == 0 else ("release", "ours")):
      t0 = time.perf_counter()
      (ours if name == "ours" else theirs)()
      times[name].append(time.perf_counter() - t0)
    a, b = times["ours"][-1], times["release"][-1]
    print(f"pair {i + 1:>3}  ours {a:6.2f} s  release {b:6.2f} s  release / ours {b / a:5.2f}  "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
  ratios = [b / a for a, b in zip(times["ours"], times["release"])]
  n = args.seq_len
  for name, t in times.items():
    print(f"{name:<8} best {min(t):.3f} s ({n / min(t):.1f} tokens/s), "
          f"median {statistics.median(t):.3f} s ({n / statistics.median(t):.1f} tokens/s)")
  print(f"tokens/s ours / release per pair: min {min(ratios):.2f}, median "
        f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}; of medians "
        f"{statistics.median(times['release']) / statistics.median(times['ours']):.2f}")


if __name__ == "__main__":
  main()
