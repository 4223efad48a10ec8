"""Input-pipeline throughput on one core, against what the 151M training step consumes.

Pins the process to one CPU (SentencePiece's and grain's threads included),
then times the stages bipe-train runs:
  read + tokenize   `pipeline.prepare` on `--source` (default the Python
                    standard library's sources, `--max_documents` of them) with a
                    tokenizer trained beforehand (untimed): corpus tokens / s;
  ids + pack + batch `pipeline.train_iterator` (bilevel ids, positions, document
                    ids, loss mask) for `windows` and `documents` packing, batches
                    of `--batch` x `--seq_len`: tokens / s over `--batches` batches.
"end to end" is the rate of doing both one after the other for every token,
1 / (1/read+tokenize + 1/ids+pack+batch). The training step's consumption is
`--step_tokens_per_s`, or measured in the same run by benchmarks/train_step.py
(151M bipe_rope, batch 1 x 1024); the ratio is end to end over it.

  python benchmarks/pipeline.py
  python benchmarks/pipeline.py --step_tokens_per_s 150 --max_documents 100 --batches 20
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _config(args):
  sys.path.insert(0, REPO)
  from bipe_jax.configs import base
  c = base.get_config()
  c.data.source, c.data.max_documents = args.source, args.max_documents
  c.data.seq_len, c.train.batch_size = args.seq_len, args.batch
  c.tokenizer.vocab_size = args.vocab_size
  c.tokenizer.sample_bytes = 2_000_000
  return c


def stage_rates(args) -> dict:
  """tokens/s of read+tokenize and of ids+pack+batch per packing, on this process's CPUs."""
  from bipe_jax.data import pipeline, tokenizer
  c = _config(args)
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    c.data.cache_dir = os.path.join(tmp, "data")
    os.makedirs(c.data.cache_dir)
    plan = pipeline._Plan(c, c.data.cache_dir)
    tokenizer.load_or_train(c, c.data.cache_dir,
                            lambda: plan.tokenizer_sample(int(c.tokenizer.sample_bytes)))
    t0 = time.perf_counter()
    corpus = pipeline.prepare(c, tmp)     # finds the tokenizer; reads and tokenizes
    seconds = time.perf_counter() - t0
    n_tokens = len(corpus.train_tokens) + len(corpus.heldout_tokens)
    rates["read + tokenize"] = (n_tokens / seconds, n_tokens, seconds)
    for packing in pipeline.PACKINGS:
      c.data.packing = packing
      it = pipeline.train_iterator(c, corpus)
      next(it)   # start the threads, fill the buffers
      t0 = time.perf_counter()
      for _ in range(args.batches):
        batch = next(it)
      seconds = time.perf_counter() - t0
      n = args.batches * batch["tokens"].size
      rates[f"ids + pack + batch ({packing})"] = (n / seconds, n, seconds)
  return rates


def step_tokens_per_s() -> float:
  """The 151M bipe_rope step's tokens/s, measured now by train_step.py (both CPUs)."""
  out = subprocess.run([sys.executable, os.path.join(HERE, "train_step.py"), "--kinds",
                        "bipe_rope", "--steps", "2"], capture_output=True, text=True, check=True)
  line = next(x for x in out.stdout.splitlines() if x.startswith("1 bipe_jax bipe_rope"))
  return float(line.split()[3])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--source", default="stdlib", help="data.source (files, globs or stdlib)")
  ap.add_argument("--max_documents", type=int, default=400)
  ap.add_argument("--vocab_size", type=int, default=32000, help="tokenizer pieces (trained here)")
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8, help="rows per batch")
  ap.add_argument("--batches", type=int, default=200, help="timed batches per packing")
  ap.add_argument("--step_tokens_per_s", type=float, default=0.0,
                  help="the training step's tokens/s (0: measure the 151M step now)")
  args = ap.parse_args(argv)
  allowed = os.sched_getaffinity(0)
  cpu = min(allowed)
  os.sched_setaffinity(0, {cpu})    # before any tokenizer or grain thread starts
  rates = stage_rates(args)
  print(f"one core (CPU {cpu}); {args.source}, {args.max_documents or 'all'} documents; "
        f"batches of {args.batch} x {args.seq_len}; {args.vocab_size}-piece tokenizer")
  print(f"{'stage':<34} {'tokens/s':>12} {'tokens':>10} {'s':>7}")
  for name, (rate, n, s) in rates.items():
    print(f"{name:<34} {rate:>12,.0f} {n:>10,} {s:>7.2f}")
  os.sched_setaffinity(0, allowed)
  step = args.step_tokens_per_s or step_tokens_per_s()
  tok_rate = rates["read + tokenize"][0]
  for packing in ("windows", "documents"):
    e2e = 1.0 / (1.0 / tok_rate + 1.0 / rates[f"ids + pack + batch ({packing})"][0])
    print(f"end to end ({packing}): {e2e:,.0f} tokens/s on one core = {e2e / step:,.0f}x the "
          f"training step's {step:.1f} tokens/s")


if __name__ == "__main__":
  main()
