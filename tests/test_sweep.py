"""launch/sweep.py: expansion, work-dir names, printed commands, failure isolation and resume."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bipe_jax import config as config_lib
from configs import quickstart
from tiny import REPO, tiny_config

_spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "launch", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep"] = sweep  # dataclasses look their module up while it loads
_spec.loader.exec_module(sweep)


def test_expansion_order_names_and_overrides():
  s = sweep.load_sweep(os.path.join(REPO, "configs", "sweeps", "stdlib.py"))
  runs = sweep.expand(s, "R")
  kinds = ("rope", "bipe_rope", "alibi", "bipe_alibi", "none")
  assert [r.name for r in runs] == [f"pe.kind={k}__seed={i}" for k in kinds for i in (0, 1)]
  assert all(r.workdir == os.path.join("R", r.name) for r in runs)
  fixed = [tuple(kv) for kv in s.overrides]
  assert runs[3].overrides == fixed + [("pe.kind", "bipe_rope"), ("seed", 1)]
  assert sweep.expand(s)[0].workdir == os.path.join("runs/sweeps/stdlib", runs[0].name)
  for name in ("prose", "arithmetic"):  # every shipped sweep file loads and expands
    assert sweep.expand(sweep.load_sweep(os.path.join(REPO, "configs", "sweeps", f"{name}.py")))


def test_an_axis_sets_several_keys_together():
  for name in ("levels_stdlib", "levels_prose"):
    s = sweep.load_sweep(os.path.join(REPO, "configs", "sweeps", f"{name}.py"))
    runs = sweep.expand(s, "R")
    variants = [("rope", 2), ("bipe_rope", 2), ("bipe_rope", 3),
                ("alibi", 2), ("bipe_alibi", 2), ("bipe_alibi", 3)]
    assert [r.name for r in runs] == [f"pe.kind={k}__pe.levels={n}__seed={i}"
                                      for k, n in variants for i in (0, 1)]
    assert runs[5].overrides[-3:] == [("pe.kind", "bipe_rope"), ("pe.levels", 3), ("seed", 1)]
    for run in runs:  # every run's config is valid
      c = quickstart.get_config()
      for key, value in run.overrides:
        *section, leaf = key.split(".")
        (c[section[0]] if section else c)[leaf] = value
      config_lib.validate(c)
  s.product = ((("pe.kind", "pe.levels"), (("rope", 2), ("bipe_rope",))),)
  with pytest.raises(sweep.SweepError, match="tuple of 2"):
    sweep.expand(s)
  s.product = ((("pe.kind", "seed"), (("rope", 2),)), ("seed", (0,)))
  with pytest.raises(sweep.SweepError, match="names a key twice"):
    sweep.expand(s)


def test_values_and_names_are_formatted_for_cli_and_paths():
  assert sweep.format_value((64, 128)) == "(64,128)"
  assert sweep.format_value((64,)) == "(64,)"
  assert sweep.format_value(0.002) == "0.002"
  assert sweep.run_name([("data.source", "a/b c*.txt"), ("seed", 3)]) == \
      "data.source=a-b-c-.txt__seed=3"


def test_duplicate_names_and_bad_files_fail(tmp_path):
  s = sweep.load_sweep(os.path.join(REPO, "configs", "sweeps", "stdlib.py"))
  s.product = (("data.source", ("a/b", "a b")),)
  with pytest.raises(sweep.SweepError, match="same work-dir name"):
    sweep.expand(s)
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\ndef get_config():\n  s = ml_collections.ConfigDict()\n"
                 "  s.base = 'x'\n  s.prodcut = ()\n  return s\n")
  with pytest.raises(sweep.SweepError, match="product"):
    sweep.load_sweep(str(bad))
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sweep.py"), str(tmp_path / "no.py")],
                     capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.startswith("error: sweep file")


def test_print_gives_one_command_per_run(capsys):
  assert sweep.main([os.path.join(REPO, "configs", "sweeps", "stdlib.py"), "--print",
                     "--only=*seed=1", "--train_cmd=sbatch launch/slurm_gpu.sbatch"]) == 0
  lines = capsys.readouterr().out.strip().split("\n")
  assert len(lines) == 5
  assert lines[0].startswith("sbatch launch/slurm_gpu.sbatch --config=configs/quickstart.py "
                             "--workdir=runs/sweeps/stdlib/pe.kind=rope__seed=1 ")
  assert "'--config.eval.lengths=(64,128,256,512,1024)'" in lines[0]
  assert lines[0].endswith("--config.pe.kind=rope --config.seed=1 && bipe-eval "
                           "--workdir=runs/sweeps/stdlib/pe.kind=rope__seed=1")


def _tiny_sweep(tmp_path) -> str:
  c = tiny_config(steps=40)
  c.train.checkpoint_every = 5
  c.train.log_every = 5
  c.data.cache_dir = str(tmp_path / "cache")
  base = config_lib.flat_keys(quickstart.get_config())
  overrides = [(k, v) for k, v in config_lib.flat_keys(c).items() if v != base[k]]
  path = tmp_path / "tiny_sweep.py"
  path.write_text(
      "import ml_collections\n\ndef get_config():\n  s = ml_collections.ConfigDict()\n"
      "  s.base = 'configs/quickstart.py'\n"
      f"  s.root = {str(tmp_path / 'runs')!r}\n"
      f"  s.overrides = {tuple(overrides)!r}\n"
      "  s.product = (('pe.kind', ('rope', 'nope', 'alibi')),)\n"
      "  s.eval_args = ('--stride=16', '--per_position')\n  return s\n")
  return str(path)


def test_interrupted_sweep_resumes_skips_finished_and_survives_a_failure(tmp_path):
  path = _tiny_sweep(tmp_path)
  root = tmp_path / "runs"
  done, resumed = root / "pe.kind=rope", root / "pe.kind=alibi"
  os.makedirs(done)
  (done / "eval.json").write_text('{"finished": "before"}')  # a run finished earlier
  cmd = [sys.executable, os.path.join(REPO, "launch", "sweep.py"), path]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  # Interrupt the third run as soon as its first checkpoint is committed.
  while not (resumed / "checkpoints" / "5").is_dir():
    assert proc.poll() is None, f"sweep ended before the interruption:\n{proc.stdout.read()}"
    assert time.time() < deadline, "no checkpoint within 10 minutes"
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out1 = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130, out1
  assert "[1/3] pe.kind=rope: finished before, skipped" in out1
  assert "[2/3] pe.kind=nope: train failed (exit 2)" in out1, "a failing run is reported"
  assert "[3/3] pe.kind=alibi: train stopped" in out1, "the failure did not stop the sweep"
  assert not (resumed / "eval.json").exists()

  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  log = (resumed / "sweep.log").read_text()
  assert r.returncode == 1, r.stdout + r.stderr + log[-3000:]  # the failing run still fails
  assert (resumed / "eval.json").is_file(), r.stdout + log[-3000:]
  starts = [int(l.split()[3]) for l in log.splitlines() if l.startswith("resuming from step")]
  assert len(starts) == 1 and 5 <= starts[0] < 40, log
  steps = [json.loads(l)["step"] for l in open(resumed / "metrics.jsonl")]
  assert steps[-1] == 40 and len(steps) == len(set(steps)), steps
  assert (done / "eval.json").read_text() == '{"finished": "before"}'
  assert not (done / "checkpoints").exists(), "a finished run was trained again"
  result = json.loads((resumed / "eval.json").read_text())
  assert result["step"] == 40 and [x["length"] for x in result["results"]] == [32, 64]
  assert [(x["window"], x["stride"]) for x in result["sliding_window"]] == [(32, 16), (64, 16)]
  assert [len(x["mean_nll"]) for x in result["per_position"]] == [32, 64]
  assert (resumed / "per_position.png").is_file()
  status = [json.loads(l) for l in open(root / "sweep.jsonl")]
  assert [(s["run"], s["stage"], s["status"]) for s in status] == [
      ("pe.kind=nope", "train", "failed (exit 2)"), ("pe.kind=alibi", "train", "stopped"),
      ("pe.kind=nope", "train", "failed (exit 2)"), ("pe.kind=alibi", "train", "ok"),
      ("pe.kind=alibi", "eval", "ok")]
