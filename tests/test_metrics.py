"""metrics.jsonl and TensorBoard events hold each step once across resumes and restarts."""
import json
import os

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from bipe_jax import metrics


def _jsonl(workdir):
  return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))]


def _events(tb):
  return [(e.step, v.tensor.float_val[0]) for f in sorted(os.listdir(tb))
          for e in EventFileLoader(os.path.join(tb, f)).Load() for v in e.summary.value]


def test_resume_cuts_logs_back_and_a_fresh_start_moves_them_aside(tmp_path, capsys):
  workdir = str(tmp_path)
  w = metrics.MetricWriter(workdir, 0)
  for step in range(1, 8):
    w.write(step, {"loss": step})
  w.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 8, "lo')   # a row cut short by kill -9
  assert capsys.readouterr().out == ""
  # Resumed from a checkpoint at step 4: steps 5.. are logged again, with new values.
  w = metrics.MetricWriter(workdir, 4)
  assert "dropped 4 logged rows" in capsys.readouterr().out
  for step in (5, 6):
    w.write(step, {"loss": 10 * step})
  w.close()
  expected = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60)]
  assert _jsonl(workdir) == expected
  assert _events(os.path.join(workdir, "tb")) == expected, "TensorBoard must show one value per step"
  # Started again from step 0 (checkpoints deleted): the old logs move aside whole.
  metrics.MetricWriter(workdir, 0).close()
  printed = capsys.readouterr().out
  assert printed.startswith("starting from step 0") and printed.count("\n") == 1
  aside = [d for d in os.listdir(workdir) if d.startswith("logs_before_")]
  assert len(aside) == 1 and printed.strip().endswith(aside[0])
  assert _jsonl(workdir) == [] and _events(os.path.join(workdir, "tb")) == []
  assert _jsonl(os.path.join(workdir, aside[0])) == expected
  assert _events(os.path.join(workdir, aside[0], "tb")) == expected
