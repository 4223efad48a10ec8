#!/usr/bin/env python3
"""Runs N cooperating processes of bipe-train (or bipe-eval) on this machine.

    python launch/local.py --num_processes=2 --cpu_devices=2 -- \\
        --config=configs/quickstart.py --workdir=runs/mp [--config.mesh.shape=fsdp=4 ...]

Everything after `--` goes to every process unchanged, exactly as bipe-train
takes it; the launcher adds --coordinator_address=127.0.0.1:PORT,
--num_processes and --process_id. Each process's output is prefixed with its
index. If one process fails the others are stopped, and the launcher exits
with the failing status.

--cpu_devices=K gives each process K fake CPU devices (testing a multi-host
layout without accelerators); --gpus_per_process=K gives process i the GPUs
i*K .. i*K+K-1 through CUDA_VISIBLE_DEVICES.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(i: int, args) -> dict:
  env = dict(os.environ)
  # Run from a checkout without installing: the repo root goes on the path.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  if args.cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
  if args.gpus_per_process:
    k = args.gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * k, i * k + k))
  return env


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(prefix + line)
    sys.stdout.flush()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   usage="%(prog)s [options] -- BIPE_TRAIN_ARGS...")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--module", default="bipe_jax.train",
                      help="python module each process runs (bipe_jax.evaluate for bipe-eval)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="fake CPU devices per process (0: use the real backend)")
  parser.add_argument("--gpus_per_process", type=int, default=0)
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  rest = argv[split + 1:]
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes} must be at least 1")
  address = f"127.0.0.1:{args.port or free_port()}"
  procs, pumps = [], []
  for i in range(args.num_processes):
    cmd = [sys.executable, "-m", args.module, *rest, f"--coordinator_address={address}",
           f"--num_processes={args.num_processes}", f"--process_id={i}"]
    p = subprocess.Popen(cmd, env=process_env(i, args), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] "), daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)
  status, deadline = 0, None
  try:
    pending = set(range(len(procs)))
    while pending:
      for i in sorted(pending):
        try:
          rc = procs[i].wait(timeout=0.2)
        except subprocess.TimeoutExpired:
          continue
        pending.discard(i)
        if rc and not status:
          status = rc
          print(f"launch: process {i} exited with status {rc}; stopping the others",
                file=sys.stderr, flush=True)
          for j in pending:
            procs[j].send_signal(signal.SIGTERM)
          # A survivor may sit in a collective waiting for the dead one: kill it soon.
          deadline = time.time() + 30
      if deadline is not None and time.time() > deadline:
        for j in pending:
          procs[j].kill()
        deadline = None
  except KeyboardInterrupt:
    # Ctrl-C in a terminal reached the processes too; SIGTERM (not a second
    # SIGINT, which aborts a save) also covers a SIGINT sent to the launcher only.
    for p in procs:
      p.send_signal(signal.SIGTERM)
  for p in procs:
    status = status or p.wait()
  for t in pumps:
    t.join(timeout=5)
  return status


if __name__ == "__main__":
  sys.exit(main())
