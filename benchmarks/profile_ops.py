"""The costliest XLA ops of a jax.profiler trace on CPU, from its .xplane.pb.

Sums, per op name (numbered instances of one op merged), the time XLA's CPU
executor threads spent in it; nested events (a loop and the ops inside it)
are each counted, so shares can add up to more than 100%.

  python benchmarks/profile_ops.py /tmp/trace
"""
from __future__ import annotations

import collections
import glob
import re
import sys


def top_ops(trace_dir: str, n: int = 25) -> str:
  import jax
  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  total, count = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:    # the executor's worker threads
        continue
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "$")):
          continue
        name = re.sub(r"\.\d+$", "", ev.name)
        total[name] += ev.duration_ns
        count[name] += 1
  flat = sum(v for k, v in total.items() if k not in ("while", "cond", "call"))
  rows = [f"{'time ms':>9} {'share':>6} {'calls':>6}  op (a loop or conditional includes its body)"]
  for name, ns in total.most_common(n):
    rows.append(f"{ns / 1e6:>9.1f} {100 * ns / max(flat, 1):>5.1f}% {count[name]:>6}  {name}")
  return "\n".join(rows)


if __name__ == "__main__":
  print(top_ops(sys.argv[1]))
