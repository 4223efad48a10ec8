"""Scalar logs TensorBoard reads (event files, no TensorFlow) plus metrics.jsonl.

Logs never hold two values for a step: a run resumed from step S first cuts
both logs back to step S (a killed run may have logged past its last
checkpoint), and a run starting from step 0 moves an earlier run's logs aside.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.summary.writer.record_writer import RecordWriter


class MetricWriter:
  """Writes scalars under <workdir>/tb (TensorBoard) and <workdir>/metrics.jsonl.

  `start_step`: the step training continues from (0 for a fresh start); the
  logs are made to end there before anything is written.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      trim_logs(workdir, start_step)
      self._tb = EventFileWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary_pb2.Summary(value=values)))
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def trim_logs(workdir: str, start_step: int) -> None:
  """Drops logged steps after `start_step`; at step 0 moves existing logs aside.

  Prints one line when it changes anything.
  """
  jsonl = os.path.join(workdir, "metrics.jsonl")
  tb = os.path.join(workdir, "tb")
  event_files = sorted(os.path.join(tb, f) for f in os.listdir(tb)
                       if "tfevents" in f) if os.path.isdir(tb) else []
  if start_step == 0:
    if os.path.exists(jsonl) or event_files:
      aside = os.path.join(workdir, time.strftime("logs_before_%Y%m%d-%H%M%S"))
      while os.path.exists(aside):  # two restarts within a second
        aside += "_"
      os.makedirs(aside)
      for path in (jsonl, tb):
        if os.path.exists(path):
          shutil.move(path, aside)
      print(f"starting from step 0 in a work dir that holds an earlier run's logs: "
            f"moved metrics.jsonl and tb/ to {aside}", flush=True)
    return
  dropped = _trim_jsonl(jsonl, start_step) if os.path.exists(jsonl) else 0
  for path in event_files:
    _trim_events(path, start_step)
  if dropped:
    print(f"resuming from step {start_step}: dropped {dropped} logged rows past it "
          "(the resumed run logs those steps again)", flush=True)


def _trim_jsonl(path: str, last: int) -> int:
  """Keeps the rows of steps <= last (and drops a line cut short by a kill); returns rows dropped."""
  with open(path) as f:
    lines = f.read().splitlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass
  if len(keep) < len(lines):
    _replace(path, "".join(l + "\n" for l in keep).encode())
  return len(lines) - len(keep)


def _trim_events(path: str, last: int) -> None:
  """Rewrites an event file without the events of steps > last (if it holds any)."""
  records = list(RawEventFileLoader(path).Load())
  keep = [r for r in records if event_pb2.Event.FromString(r).step <= last]
  if len(keep) == len(records):
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    writer = RecordWriter(f)
    for r in keep:
      writer.write(r)
    writer.flush()
  os.replace(tmp, path)


def _replace(path: str, data: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
