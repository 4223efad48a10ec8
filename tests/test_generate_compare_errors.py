"""Bad or unusual input to bipe-generate, bipe-eval --task=passkey and bipe-compare:
exit status 2 with one line `error: ...` naming the flag or file, no work wasted
before a failure that was known up front, and tables that count each run once."""
import json
import os
import subprocess
import sys

import pytest

from bipe_jax import compare, decode
from bipe_jax.tasks import passkey
from tiny import REPO, cli_args, tiny_config


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def _drive(module, cases, tmp_path) -> list:
  """Runs `module.run(args)` for each case in one process (tests/cli_driver.py)."""
  path = tmp_path / f"{module}.cases.json"
  path.write_text(json.dumps(cases))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_driver.py"), module,
                         str(path)], capture_output=True, text=True, cwd=REPO, timeout=600,
                        env=_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def _one_error_line(code, stderr, traceback, *names):
  lines = stderr.splitlines()
  assert code == 2 and not traceback and "Traceback" not in stderr, (code, stderr, traceback)
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  for name in names:
    assert name in lines[0], (name, lines[0])


# bipe-generate ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
  """A work dir with a checkpoint of the tiny model (2 steps)."""
  c = tiny_config(steps=2)
  c.train.log_every, c.train.checkpoint_every = 2, 2
  workdir = str(tmp_path_factory.mktemp("gen") / "run")
  proc = subprocess.run([sys.executable, "-m", "bipe_jax.train", *cli_args(c),
                         f"--workdir={workdir}"], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_generate_out_of_range_seed_and_token_counts_exit_2_naming_the_flag(trained, tmp_path):
  w, p = f"--workdir={trained}", "--prompt=def main("
  cases = [
      # A seed jax cannot take (was an OverflowError traceback).
      ([w, p, "--temperature=1", f"--seed={10**30}"], ("--seed",)),
      ([w, p, "--temperature=1", f"--seed={-10**30}"], ("--seed",)),
      # More tokens than the int32 counters hold (was an OverflowError traceback).
      ([w, p, f"--max_new_tokens={10**20}"], ("--max_new_tokens",)),
      # A cache larger than any memory here (137 GB): was a RESOURCE_EXHAUSTED traceback.
      ([w, p, f"--max_new_tokens={2**30}"], ("--max_new_tokens", "does not fit in memory")),
  ]
  results = _drive("bipe_jax.generate", [args for args, _ in cases], tmp_path)
  for r, (_, names) in zip(results, cases):
    _one_error_line(r["code"], r["stderr"], r["traceback"], *names)


# bipe-eval --task=passkey ---------------------------------------------------------

class _NoDecoding:
  """A generator stand-in that records its calls and answers each prompt with '1'."""

  def __init__(self, tok):
    self.calls, self.one = 0, [int(t) for t in tok.encode("1")]

  def __call__(self, params, prompts, max_new):
    self.calls += 1
    return type("Out", (), {"tokens": [self.one for _ in prompts]})()


def test_passkey_length_too_short_fails_before_any_decoding(code_tokenizer):
  gen = _NoDecoding(code_tokenizer)
  with pytest.raises(ValueError, match="passkey length 50 is too short.*at least"):
    passkey.accuracy(gen, None, code_tokenizer, (400, 50), (0.0, 1.0), trials=1,
                     log=lambda *_: None)
  assert gen.calls == 0, "the 400-token prompts were decoded before 50 was found too short"


def test_passkey_repeated_lengths_and_depths_count_once(code_tokenizer):
  gen = _NoDecoding(code_tokenizer)
  rows = passkey.accuracy(gen, None, code_tokenizer, (400, 400), (0.5, 0.0, 0.5), trials=2,
                          log=lambda *_: None)
  assert [(r["length"], r["depth"], r["trials"]) for r in rows] == [(400, 0.5, 2), (400, 0.0, 2)]


# bipe-compare ---------------------------------------------------------------------

def _run_dir(root, name, seed=0, ppls=(10.0, 20.0), eval_text=None):
  d = os.path.join(root, name)
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"seed": seed, "pe": {"kind": "bipe_rope"}, "data": {"seq_len": 64}}, f)
  if eval_text is None:
    eval_text = json.dumps({"pe_kind": "bipe_rope", "train_length": 64, "results": [
        {"length": L, "ppl": p} for L, p in zip((64, 128), ppls)]})
  with open(os.path.join(d, "eval.json"), "w") as f:
    f.write(eval_text)
  return d


def _main(argv, capsys):
  code = compare.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_compare_out_in_a_new_directory_is_created(tmp_path):
  a = _run_dir(str(tmp_path), "a")
  out = str(tmp_path / "new" / "sub" / "cmp")
  compare.compare([a], out=out)
  assert os.path.isfile(out + ".md") and os.path.isfile(out + ".png")


@pytest.mark.parametrize("text,why", [
    ('{"results": [', "is damaged"),                           # truncated
    ("[1, 2]", "not a JSON object"),                           # not an object
    ('{"results": [{"length": 64}]}', "ppl"),                  # entries without ppl
    ('{"pe_kind": "rope"}', "neither perplexity"),             # nothing to compare
])
def test_compare_damaged_eval_json_exits_2_naming_the_file(tmp_path, capsys, text, why):
  good = _run_dir(str(tmp_path), "good")
  bad = _run_dir(str(tmp_path), "bad", eval_text=text)
  code, out, err = _main([good, bad, f"--out={tmp_path}/cmp"], capsys)
  _one_error_line(code, err, "", os.path.join(bad, "eval.json"), why)
  assert not os.path.exists(f"{tmp_path}/cmp.md")


def test_compare_a_named_dir_without_eval_json_exits_2_naming_it(tmp_path, capsys):
  good = _run_dir(str(tmp_path), "good")
  missing = str(tmp_path / "typo")
  unevaluated = str(tmp_path / "unevaluated")
  os.makedirs(unevaluated)
  for other in (missing, unevaluated):
    code, out, err = _main([good, other, f"--out={tmp_path}/cmp"], capsys)
    _one_error_line(code, err, "", other)
    assert not os.path.exists(f"{tmp_path}/cmp.md")


def test_compare_counts_a_run_named_twice_once(tmp_path):
  a = _run_dir(str(tmp_path), "a", ppls=(10.0, 20.0))
  _run_dir(str(tmp_path), "b", seed=1, ppls=(12.0, 22.0))
  md = compare.compare([a, a + "/", os.path.join(str(tmp_path), ".", "a")],
                       out=str(tmp_path / "one"))
  assert "| bipe_rope | 1 | 10.00 | 20.00 |" in md, md
  md = compare.compare([str(tmp_path / "*"), a + "/"], out=str(tmp_path / "two"))
  assert "| bipe_rope | 2 | 11.00 ± 1.41 | 21.00 ± 1.41 |" in md, md


def test_compare_out_as_a_directory_or_with_md_names_compare_files(tmp_path):
  a = _run_dir(str(tmp_path), "a")
  for out, prefix in [(str(tmp_path / "new_dir") + "/", tmp_path / "new_dir" / "compare"),
                      (str(tmp_path / "new_dir"), tmp_path / "new_dir" / "compare"),  # exists now
                      (str(tmp_path / "table.md"), tmp_path / "table")]:
    md = compare.compare([a], out=out)
    assert f"Plot: {prefix}.png" in md, md
    assert (tmp_path / f"{prefix}.md").is_file() and (tmp_path / f"{prefix}.png").is_file()
  assert not [p for p in os.listdir(tmp_path / "new_dir") if p.startswith(".")]
  assert not (tmp_path / "table.md.md").exists()


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -0.5])
def test_sampling_refuses_a_temperature_that_is_not_finite_and_non_negative(temperature):
  with pytest.raises(ValueError, match="temperature"):
    decode.Sampling(temperature=temperature)


def test_compare_keeps_runs_evaluated_differently_in_rows_of_their_own(tmp_path):
  def ev(step, scaling="none"):
    return json.dumps({"pe_kind": "bipe_rope", "train_length": 64, "step": step,
                       "rope_scaling": {"kind": scaling, "factor": 4.0},
                       "results": [{"length": 64, "ppl": 10.0 + step}]})
  # Two seeds of one config, one evaluated at an earlier checkpoint; a third with YaRN.
  _run_dir(str(tmp_path), "s0", seed=0, eval_text=ev(10))
  _run_dir(str(tmp_path), "s1", seed=1, eval_text=ev(5))
  _run_dir(str(tmp_path), "s2", seed=2, eval_text=ev(10, "yarn"))
  _run_dir(str(tmp_path), "s3", seed=3, eval_text=ev(10))
  md = compare.compare([str(tmp_path / "s*")], out=str(tmp_path / "cmp"))
  rows = [l for l in md.splitlines() if l.startswith("| evaluated")]
  assert len(rows) == 3, md
  assert any("evaluated.rope_scaling=none, evaluated.step=10 | 2 | 20.00 ± 0.00" in l
             for l in rows), md
  assert any("evaluated.step=5" in l and "| 1 | 15.00" in l for l in rows), md
  assert any("yarn x4.0" in l for l in rows), md
