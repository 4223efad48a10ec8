#!/usr/bin/env python3
"""Runs a sweep: a base config times a product of overrides, one work dir per run.

    python launch/sweep.py configs/sweeps/stdlib.py [--root=DIR] [--only=GLOB]
    python launch/sweep.py configs/sweeps/stdlib.py --print [--train_cmd=...]

A sweep file's `get_config()` returns an ml_collections ConfigDict with
  base:      config file every run starts from (relative to the repository root)
  overrides: ((key, value), ...) applied to every run
  product:   ((key, (value, ...)), ...) the axes; runs are their product, in order.
             An axis may set several keys together: ((key, key), ((v, v), ...)),
             e.g. pe.kind and pe.levels, for combinations that are not a product
  root:      directory holding one work dir per run (default runs/sweeps/<file name>)
  eval_args: extra bipe-eval flags, e.g. ("--stride=64",)
A run's work dir is <root>/<key>=<value>__<key>=<value>... over the product axes.

Runs go one after another: bipe-train (which resumes from the run's latest
checkpoint), then bipe-eval. A run whose eval.json exists is finished and
skipped, so running the same command again continues a half-done sweep. A
failing run is reported and the others still run; the exit status is 1 if any
failed. SIGTERM or Ctrl-C stops the sweep after the current training has saved
a checkpoint. Each run's output goes to <dir>/sweep.log, and one line per stage
({run, stage, status, seconds}) to <root>/sweep.jsonl.

--print writes one shell command per run (train && eval) for a cluster
launcher instead of running anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # sweep files import configs.*
from bipe_jax import pyconfig  # pylint: disable=g-import-not-at-top,wrong-import-position

SWEEP_KEYS = {"base", "overrides", "product", "root", "eval_args"}


class SweepError(ValueError):
  pass


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  overrides: list  # [(dotted key, value)]: the sweep's fixed overrides, then this run's axes


def load_sweep(path: str):
  sweep = pyconfig.load_get_config(path, "sweep file", "configs/sweeps/stdlib.py", SweepError)
  unknown = set(sweep.keys()) - SWEEP_KEYS
  if unknown or "base" not in sweep or "product" not in sweep:
    raise SweepError(f"sweep file {path}: needs keys base and product, may have "
                     f"{', '.join(sorted(SWEEP_KEYS))}; got {', '.join(sorted(sweep.keys()))}")
  return sweep


def format_value(v) -> str:
  """A value as bipe-train's --config.KEY= parser reads it (tuples as (a,b))."""
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(format_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def run_name(axes: list) -> str:
  """<key>=<value> joined by "__"; characters a path should not hold become "-"."""
  parts = [f"{k}={format_value(v)}" for k, v in axes]
  return "__".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", p) for p in parts)


def _pairs(what: str, items, example: str) -> list[tuple]:
  """`items` as a list of 2-tuples, or a SweepError naming `what` and `example`."""
  seq = (tuple, list)
  if not isinstance(items, seq) or not all(isinstance(x, seq) and len(x) == 2 for x in items):
    raise SweepError(f"sweep {what} must be a tuple of (key, value) pairs, e.g. {example}; "
                     f"got {items!r}")
  return [tuple(x) for x in items]


def expand(sweep, root: str | None = None, sweep_path: str = "sweep") -> list[Run]:
  """The sweep's runs in product order (the last axis varies fastest)."""
  product = _pairs("product", sweep.product, "((\"pe.kind\", (\"rope\", \"alibi\")),)")
  for k, values in product:
    if not isinstance(values, (tuple, list)):  # ("seed", (0)) or ("pe.kind", ("rope"))
      raise SweepError(f"sweep axis {k!r}: its values must be a tuple, got {values!r}; "
                       f"a single value is written ({values!r},)")
  product = [(k, tuple(v)) for k, v in product]
  if not product or any(not values for _, values in product):
    raise SweepError("sweep product must name at least one key, each with at least one value")
  keys = [k for k, _ in product]
  flat = [k for ks in keys for k in (ks if isinstance(ks, (tuple, list)) else [ks])]
  if len(set(flat)) != len(flat):
    raise SweepError(f"sweep product names a key twice: {flat}")
  for ks, values in product:
    if isinstance(ks, (tuple, list)) and any(
        not isinstance(v, (tuple, list)) or len(v) != len(ks) for v in values):
      raise SweepError(f"sweep axis {tuple(ks)} sets {len(ks)} keys together: each of its "
                       f"values must be a tuple of {len(ks)}, got {values}")
  fixed = _pairs("overrides", sweep.get("overrides", ()), "((\"train.steps\", 400),)")
  extra = sweep.get("eval_args", ())
  if not isinstance(extra, (tuple, list)) or not all(isinstance(a, str) for a in extra):
    raise SweepError(f"sweep eval_args must be a tuple of flags, e.g. (\"--stride=64\",); "
                     f"got {extra!r}")
  root = root or sweep.get("root") or os.path.join(
      "runs", "sweeps", os.path.splitext(os.path.basename(sweep_path))[0])
  runs = []
  for values in itertools.product(*[v for _, v in product]):
    axes = []
    for ks, v in zip(keys, values):
      axes += list(zip(ks, v)) if isinstance(ks, (tuple, list)) else [(ks, v)]
    name = run_name(axes)
    runs.append(Run(name, os.path.join(root, name), fixed + axes))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise SweepError("two runs of the sweep get the same work-dir name; make the values distinct")
  return runs


def train_args(sweep, run: Run, base: str) -> list[str]:
  return [f"--config={base}", f"--workdir={run.workdir}"] + [
      f"--config.{k}={format_value(v)}" for k, v in run.overrides]


def eval_args(sweep, run: Run) -> list[str]:
  return [f"--workdir={run.workdir}"] + list(sweep.get("eval_args", ()))


def print_commands(sweep, runs, train_cmd: str, eval_cmd: str) -> None:
  for run in runs:
    train = " ".join(shlex.quote(a) for a in train_args(sweep, run, sweep.base))
    ev = " ".join(shlex.quote(a) for a in eval_args(sweep, run))
    print(f"{train_cmd} {train} && {eval_cmd} {ev}")


def finished(run: Run) -> bool:
  return os.path.isfile(os.path.join(run.workdir, "eval.json"))


def trained(run: Run) -> bool:
  """The run's latest checkpoint is at its config's train.steps."""
  try:
    with open(os.path.join(run.workdir, "config.json")) as f:
      steps = json.load(f)["train"]["steps"]
    saved = [int(d) for d in os.listdir(os.path.join(run.workdir, "checkpoints")) if d.isdigit()]
  except (OSError, KeyError, ValueError):
    return False
  return bool(saved) and max(saved) >= steps


class _Stop:
  """SIGTERM / SIGINT: pass SIGTERM to the running stage (it checkpoints), start nothing new."""

  def __init__(self):
    self.signal, self.child = None, None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signal = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)


def _stage(cmd: list[str], log_path: str, stop: _Stop) -> int:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
    log.flush()
    # Own session: a Ctrl-C reaches the sweep alone, which passes SIGTERM on.
    stop.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    rc = stop.child.wait()
    stop.child = None
  return rc


def _print(line: str) -> None:
  print(line, flush=True)


def run_sweep(sweep, runs: list[Run], log=_print) -> int:
  """Runs every unfinished run; returns the number of failed runs (-1 if stopped)."""
  base = sweep.base if os.path.isabs(sweep.base) else os.path.join(REPO, sweep.base)
  if not os.path.isfile(base):
    raise SweepError(f"sweep base config {sweep.base!r} not found (looked for {base})")
  stop = _Stop()
  failed, t_sweep = [], time.time()
  for i, run in enumerate(runs, 1):
    tag = f"[{i}/{len(runs)}] {run.name}"
    if finished(run):
      log(f"{tag}: finished before, skipped")
      continue
    os.makedirs(run.workdir, exist_ok=True)
    status_path = os.path.join(os.path.dirname(run.workdir) or ".", "sweep.jsonl")
    for stage, cmd in (
        ("train", [sys.executable, "-m", "bipe_jax.train", *train_args(sweep, run, base)]),
        ("eval", [sys.executable, "-m", "bipe_jax.evaluate", *eval_args(sweep, run)])):
      t0 = time.time()
      log(f"{tag}: {stage} ...")
      rc = _stage(cmd, os.path.join(run.workdir, "sweep.log"), stop)
      seconds = time.time() - t0
      ok = rc == 0 and (stage == "eval" or trained(run))
      status = "ok" if ok else ("stopped" if stop.signal else f"failed (exit {rc})" if rc
                                else "failed (training did not reach train.steps)")
      with open(status_path, "a") as f:
        f.write(json.dumps({"run": run.name, "stage": stage, "status": status,
                            "seconds": round(seconds, 1)}) + "\n")
      log(f"{tag}: {stage} {status} in {seconds:.0f}s"
          + ("" if ok else f"; see {os.path.join(run.workdir, 'sweep.log')}"))
      if stop.signal:
        log(f"received {stop.signal}: stopped; run the same command again to resume")
        return -1
      if not ok:
        failed.append(run.name)
        break
  log(f"sweep done in {time.time() - t_sweep:.0f}s: {len(runs) - len(failed)} of "
      f"{len(runs)} runs finished" + (f"; failed: {', '.join(failed)}" if failed else ""))
  return len(failed)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("sweep", help="sweep file, e.g. configs/sweeps/stdlib.py")
  parser.add_argument("--root", help="directory of the runs' work dirs (default: the sweep's root)")
  parser.add_argument("--only", help="run only runs whose name matches this glob")
  parser.add_argument("--print", action="store_true", help="print one command per run and exit")
  parser.add_argument("--train_cmd", default="bipe-train", help="train command for --print")
  parser.add_argument("--eval_cmd", default="bipe-eval", help="eval command for --print")
  args = parser.parse_args(argv)
  try:
    sweep = load_sweep(args.sweep)
    runs = expand(sweep, args.root, args.sweep)
    if args.only:
      runs = [r for r in runs if fnmatch.fnmatch(r.name, args.only)]
      if not runs:
        raise SweepError(f"--only={args.only!r} matches no run of the sweep")
    if args.print:
      print_commands(sweep, runs, args.train_cmd, args.eval_cmd)
      return 0
    failed = run_sweep(sweep, runs)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 130 if failed < 0 else int(failed > 0)


if __name__ == "__main__":
  sys.exit(main())
