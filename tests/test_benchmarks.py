"""benchmarks/gpu.sh checks its steps without a GPU (--dry-run) and fails loudly; the CPU scripts run."""
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu.sh")


def _run(tmp_path, *args, **env):
  out = tmp_path / "gpu.txt"
  proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), *args],
                        capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
  return proc, out.read_text() if out.exists() else ""


def test_gpu_script_dry_run_checks_every_step(tmp_path):
  proc, written = _run(tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for step in ("kernel tests", "Pallas BiPE-ALiBi", "cuDNN (no bias)", "151M training step",
               "evaluation 8k / 32k"):
    assert f"== {step}" in proc.stdout and f"== {step}" in written, step
  assert "dry run, steps checked" in written


def test_gpu_script_fails_early_and_says_why(tmp_path):
  proc, written = _run(tmp_path, PYTHON="false")
  assert proc.returncode != 0
  assert proc.stderr.startswith("error:") and "cannot import" in proc.stderr
  assert "== kernel tests" not in proc.stdout, "it went on after the failed check"
  proc, _ = _run(tmp_path, "--bogus")
  assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


def test_train_step_model_flops_count_non_embedding_parameters_and_attention():
  """6 x (non-embedding parameters) x tokens + 12 x layers x d x seq_len x tokens,
  the parameters counted by hand from the architecture (no token or intra table)."""
  import sys
  import types
  import flax.linen as nn
  import jax
  import numpy as np
  from bipe_jax.model import Decoder, ModelConfig
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import train_step
  v, d, layers, f, seq = 100, 16, 2, 24, 8
  cfg = ModelConfig(vocab_size=v, d_model=d, n_layers=layers, n_heads=2, n_kv_heads=2, d_ff=f,
                    pe_kind="bipe_rope", max_intra=4)
  z = np.zeros((1, seq), np.int32)
  batch = dict(tokens=z, intra=z, inter=z, positions=z, doc_ids=z)
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), batch)["params"])
  assert "intra" in params and "embed" in params
  per_layer = 4 * d * d + 3 * d * f + 2 * d     # q, k, v, o; gate, up, down; two norms
  non_embedding = layers * per_layer + d + d * v  # final norm, LM head
  c = types.SimpleNamespace(model=types.SimpleNamespace(n_layers=layers, d_model=d),
                            data=types.SimpleNamespace(seq_len=seq))
  tokens = 3 * seq
  want = 6 * non_embedding * tokens + 12 * layers * d * seq * tokens
  assert train_step.model_flops(params, c, tokens) == want


def test_step_ab_runs_both_variants_and_plain_reductions_give_the_same_loss():
  """The in-process A/B script on a tiny model: A with plain reductions, B as the code is
  but compiled with XLA's memory-optimized scheduler. Windowed and plain reductions are
  the same arithmetic up to summation order; the scheduler only orders the ops."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "step_ab.py"),
                         "--quick", "--a_plain_reductions", "--b_xla",
                         "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"],
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  losses = [float(line.rsplit("loss ", 1)[1]) for line in out.splitlines()
            if "compile+first step" in line]
  assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4, out
  assert "+ plain reductions" in out and "step   2" in out and "median step time A / B" in out
  assert "+ XLA xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED" in out


def test_step_ab_names_a_malformed_xla_option():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "step_ab.py"),
                         "--quick", "--b_xla", "scheduler=memory"],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 2 and "'scheduler=memory'" in proc.stderr, proc.stderr
  assert "xla_NAME=VALUE" in proc.stderr


def test_paired_runs_both_steps_in_one_process():
  """benchmarks/paired.py on a tiny model: ours and the release's step alternate, each pair
  gives a ratio, and both start from the loss of uniform predictions (random init)."""
  pytest.importorskip("torch")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "paired.py"), "--quick"],
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  first = next(line for line in out.splitlines() if "first steps" in line)
  ours, release = (float(x.split()[-1].rstrip(",")) for x in first.split("loss ")[1].split(", "))
  assert abs(ours - math.log(32000)) < 0.1 and abs(release - math.log(32000)) < 0.1, first
  assert "pair   2" in out and "tokens/s ours / release per pair" in out
