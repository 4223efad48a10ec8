"""Helpers shared by the benchmark scripts: best-of-n timing and one measurement per process."""
from __future__ import annotations

import json
import subprocess
import time


def best_seconds(fn, *args, repeats: int = 3) -> float:
  """Best wall time of `fn(*args)` over `repeats` runs after one untimed (compile) run."""
  import jax
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def run_json(cmd: list[str], env: dict) -> dict | str:
  """Runs a measurement in a fresh process: its last stdout line as JSON, or why it failed."""
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    return f"FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])
