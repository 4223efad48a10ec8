"""benchmarks/gpu.sh checks its steps without a GPU (--dry-run) and fails loudly."""
import os
import subprocess

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
