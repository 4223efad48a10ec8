"""The command line of bipe-train, bipe-eval and bipe-convert (bipe_jax/cli.py).

Every bad flag, config value or file must end with exit status 2 and one
stderr line `error: ...` naming it, before any compilation; a run prints its
progress lines and no library INFO lines unless --verbosity asks for them.
Many bad command lines run in one process per program (tests/cli_driver.py
calls the entry point and catches SystemExit); a few run as real programs.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bipe_jax import cli
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline, sources
from configs import quickstart
from tiny import REPO, cli_args, tiny_config

_ABSL_INFO = re.compile(r"^I\d{4} ")


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def _drive(module, cases, tmp_path) -> list:
  """Runs `module.run(args)` for each case's args in one process; its per-case results."""
  path = tmp_path / f"{module}.cases.json"
  path.write_text(json.dumps([args for args, _ in cases]))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_driver.py"), module,
                         str(path)], capture_output=True, text=True, cwd=REPO, timeout=600,
                        env=_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def _assert_one_named_error(results, cases):
  """Each case (args, name or names) exited 2 with one `error:` line holding them all."""
  wrong = []
  for r, (args, names) in zip(results, cases):
    lines = r["stderr"].splitlines()
    names = (names,) if isinstance(names, str) else names
    if not (r["code"] == 2 and not r["traceback"] and "Traceback" not in r["stderr"]
            and len(lines) == 1 and lines[0].startswith("error: ")
            and all(n in lines[0] for n in names)):
      wrong.append(f"{args[-2:]} -> exit {r['code']}, expected one error line naming "
                   f"{names!r}; stderr: {r['stderr'][-400:]!r} {r['traceback'][-800:]}")
  assert not wrong, f"{len(wrong)} of {len(cases)} bad command lines:\n" + "\n".join(wrong)


def _bad_values(keys, values):
  return [([f"--config.{k}={v}"], k) for k in keys for v in values]


def test_bad_train_command_lines_exit_2_naming_the_flag(tmp_path):
  base = cli_args(tiny_config())
  workdir = f"--workdir={tmp_path}/w"
  overrides = (
      _bad_values(("train.steps", "train.batch_size", "model.d_model", "model.n_layers",
                   "data.seq_len", "train.log_every", "train.checkpoint_every",
                   "eval.batch_tokens", "train.grad_accum_steps"),
                  ("-1", "0", "abc", "2.5", ""))
      + _bad_values(("train.lr", "model.norm_eps", "train.clip_norm", "model.init_std"),
                    ("-1", "0", "abc", "nan", ""))
      + _bad_values(("eval.max_tokens", "data.max_documents", "train.warmup_steps",
                     "train.weight_decay"), ("-1", "abc", ""))
      + _bad_values(("pe.kind", "data.packing", "train.schedule", "model.dtype",
                     "attention.impl", "data.format"), ("bogus", ""))
      + _bad_values(("eval.lengths",), ("0", "-1,64", "abc", "", "(1.5,)"))
      + _bad_values(("pe.release_padding_row",), ("maybe",))
      + _bad_values(("data.source",), (f"{tmp_path}/nonexistent/*.txt", "", " , "))
      + _bad_values(("tokenizer.model",), (f"{tmp_path}/nonexistent.model",))
      + [(["--config.train.nope=1"], "train.nope"), (["--config.train.steps"], "train.steps")])
  cases = [([*base, *extra, workdir], names) for extra, names in overrides]
  config_file = base[0]
  cases += [
      ([*base, "--config=/nonexistent/config.py", workdir], "/nonexistent/config.py"),
      ([*base, "--config=", workdir], "--config"),
      ([*base, "--workdir="], "--workdir"),
      ([*base, "--workdir=/proc/nonexistent/w"], "/proc/nonexistent/w"),
      ([*base[1:], workdir], "--config"),
      ([config_file], "--workdir"),
      ([*base, workdir, "--num_processes=abc"], "--num_processes"),
      ([*base, workdir, "--process_id=-x"], "--process_id"),
      ([*base, workdir, "--distributed=maybe"], "--distributed"),
      ([*base, workdir, "--bogus_flag=1"], "bogus_flag"),
      ([*base, workdir, "extra"], "extra"),
  ]
  _assert_one_named_error(_drive("bipe_jax.train", cases, tmp_path), cases)
  assert not os.path.exists(tmp_path / "w" / "checkpoints"), "no case may start training"


def _release_like(path, config_text, safetensors=None):
  os.makedirs(path)
  (path / "config.json").write_text(config_text)
  if safetensors is not None:
    (path / "model.safetensors").write_bytes(safetensors)
  return str(path)


_HF = json.dumps({"rpe_type": "rope", "hidden_size": 32, "num_attention_heads": 4,
                  "num_hidden_layers": 1, "intermediate_size": 64, "rms_norm_eps": 1e-5,
                  "vocab_size": 100, "train_scale": 8})


def test_bad_eval_and_convert_command_lines_exit_2_naming_the_flag_or_file(tmp_path):
  work = tmp_path / "work"
  os.makedirs(work)
  (work / "config.json").write_text(tiny_config().to_json())
  damaged = _release_like(tmp_path / "damaged", '{"model": {"d_model": 64,')
  listed = _release_like(tmp_path / "listed", "[1, 2]")
  no_json = _release_like(tmp_path / "no_json", "{not json")
  garbage = _release_like(tmp_path / "garbage", _HF, safetensors=b"\x00garbage")
  w = f"--workdir={work}"
  eval_cases = (
      [([w, f"--lengths={v}"], "--lengths") for v in ("0", "-1", "abc", "", "32,0", "1.5")]
      + [([w, f"--step={v}"], "--step") for v in ("-1", "abc", "")]
      + [([w, f"--mesh={v}"], "mesh") for v in ("bogus", "", "data=3", "data=0")]
      + [([w, f"--source={v}"], "source") for v in (f"{tmp_path}/nonexistent.txt", "")]
      + [([w, f"--config.eval.max_tokens={v}"], "eval.max_tokens") for v in ("-1", "abc")]
      + [([w, f"--config.eval.lengths={v}"], "eval.lengths") for v in ("0", "abc")]
      + [([w, "--config.attention.impl=bogus"], "attention.impl"),
         ([w, "--config.eval.batch_tokens=0"], "eval.batch_tokens"),
         ([w, "--config.nope.x=1"], "nope.x"),
         ([w, "--lengths=32", "--config.eval.lengths=64"], "--lengths"),
         ([w, "--mesh=data=1", "--config.mesh.shape=data=1"], "--mesh"),
         ([w, "--hf_checkpoint="], "--hf_checkpoint"),
         ([w, f"--hf_checkpoint={tmp_path}/nonexistent"], f"{tmp_path}/nonexistent"),
         ([w, f"--hf_checkpoint={no_json}"], f"{no_json}/config.json"),
         ([w, f"--hf_checkpoint={garbage}"], f"{garbage}/model.safetensors"),
         ([f"--workdir={damaged}"], f"{damaged}/config.json"),
         ([f"--workdir={listed}"], f"{listed}/config.json"),
         ([f"--workdir={tmp_path}/nonexistent"], f"{tmp_path}/nonexistent/config.json"),
         (["--workdir="], "--workdir"), ([], "--workdir"), ([w, "extra"], "extra"),
         ([w, "--task=bogus"], "--task"),
         ([w, "--task=passkey", "--passkey_depths=0,2"], "--passkey_depths"),
         ([w, "--task=passkey", "--passkey_depths=x"], "--passkey_depths"),
         ([w, "--task=passkey", "--passkey_trials=0"], "--passkey_trials"),
         ([w, "--task=passkey", "--passkey_digits=0"], "--passkey_digits"),
         ([w, "--task=passkey", "--source=x.txt"], "--source")])
  out = f"--workdir={tmp_path}/out"
  convert_cases = [
      ([out], "--hf_checkpoint"), ([f"--hf_checkpoint={no_json}"], "--workdir"),
      ([f"--hf_checkpoint={no_json}", "--workdir="], "--workdir"),
      (["--hf_checkpoint=", out], "--hf_checkpoint"),
      ([f"--hf_checkpoint={tmp_path}/nonexistent", out], f"{tmp_path}/nonexistent"),
      ([f"--hf_checkpoint={no_json}", out], f"{no_json}/config.json"),
      ([f"--hf_checkpoint={listed}", out], f"{listed}/config.json"),
      ([f"--hf_checkpoint={garbage}", out], f"{garbage}/model.safetensors"),
      ([f"--hf_checkpoint={garbage}", out, "--config.model.d_model=8"], "model.d_model"),
      ([f"--hf_checkpoint={garbage}", out, "--bogus=1"], "bogus"),
      ([f"--hf_checkpoint={garbage}", out, "extra"], "extra"),
  ]
  _assert_one_named_error(_drive("bipe_jax.evaluate", eval_cases, tmp_path), eval_cases)
  _assert_one_named_error(_drive("bipe_jax.convert", convert_cases, tmp_path), convert_cases)
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_quiet_progress_then_eval_overrides_and_real_entry_points(tmp_path):
  """A tiny run prints its progress lines as they happen and no library INFO line."""
  c = tiny_config(steps=6)
  c.train.log_every, c.train.checkpoint_every = 2, 3
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-m", "bipe_jax.train", *cli_args(c),
                           f"--workdir={workdir}"], cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  first = proc.stdout.readline()
  running_after_first_line = proc.poll() is None
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert first.startswith("training a 320-piece tokenizer"), first
  assert running_after_first_line, "the first line must reach the pipe before the run ends"
  assert [l.split(" |")[0] for l in out.splitlines() if l.startswith("step ")] == [
      "step 2/6", "step 4/6", "step 6/6"]
  assert not [l for l in err.splitlines() if _ABSL_INFO.match(l)], err[-3000:]
  assert len(err.splitlines()) <= 2, f"stderr should stay (nearly) empty:\n{err[-3000:]}"

  # --verbosity restores library detail; --config.KEY=VALUE reaches bipe-eval's config.
  proc = subprocess.run([sys.executable, "-m", "bipe_jax.evaluate", f"--workdir={workdir}",
                         "--lengths=32", "--config.eval.max_tokens=96", "--verbosity=0"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sum(bool(_ABSL_INFO.match(l)) for l in proc.stderr.splitlines()) > 5
  assert json.load(open(os.path.join(workdir, "eval.json")))["results"][0]["tokens"] == 96

  # bipe-generate streams a continuation of the prompt, then prefill and decode rates.
  proc = subprocess.run([sys.executable, "-m", "bipe_jax.generate", f"--workdir={workdir}",
                         "--prompt=def main(", "--max_new_tokens=12", "--chunk=5",
                         "--stop_at_bos=false"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("def main(") and len(lines[0]) > len("def main("), proc.stdout
  assert re.match(r"prefill: \d+ tokens in .*tokens/s\); decode: 12 tokens in .*tokens/s\)",
                  lines[-1]), lines[-1]
  assert len(proc.stderr.splitlines()) <= 2, proc.stderr[-3000:]

  # bipe-eval --task=passkey: the table by length and depth, passkey.json and the heat map.
  proc = subprocess.run([sys.executable, "-m", "bipe_jax.evaluate", f"--workdir={workdir}",
                         "--task=passkey", "--lengths=256", "--passkey_depths=0,1",
                         "--passkey_trials=1"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"^\s+256\s+8\.0x\s+\d+%\s+\d+%\s+\d+%$", proc.stdout, re.M), proc.stdout
  result = json.load(open(os.path.join(workdir, "passkey.json")))
  assert [(r["length"], r["depth"], r["trials"]) for r in result["passkey"]] == [
      (256, 0.0, 1), (256, 1.0, 1)]
  assert os.path.getsize(os.path.join(workdir, "passkey.png")) > 1000

  for args in (["bipe_jax.evaluate", f"--workdir={workdir}", "--lengths=0"],
               ["bipe_jax.evaluate", f"--workdir={workdir}", "--task=passkey", "--lengths=64"],
               ["bipe_jax.generate", f"--workdir={workdir}", "--prompt=x", "--stop_ids=99999"],
               ["bipe_jax.train", *cli_args(c), f"--workdir={workdir}",
                "--config.train.steps=abc"]):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_bad_generate_command_lines_exit_2_naming_the_flag(tmp_path):
  work = tmp_path / "work"
  os.makedirs(work)
  (work / "config.json").write_text(tiny_config().to_json())
  w, p = f"--workdir={work}", "--prompt=def"
  cases = [([p], "--workdir"), ([w], "--prompt"), ([w, "--prompt="], "--prompt"),
           ([w, p, "--max_new_tokens=0"], "--max_new_tokens"),
           ([w, p, "--chunk=0"], "--chunk"),
           ([w, p, "--temperature=-1"], "temperature"), ([w, p, "--top_p=0"], "top_p"),
           ([w, p, "--top_p=1.5"], "top_p"), ([w, p, "--top_k=-2"], "top_k"),
           ([w, p, "--stop_ids=a"], "--stop_ids"), ([w, p, "--step=-1"], "--step"),
           ([w, p, "--mesh=data=3"], "mesh"), ([w, p, "--config.nope.x=1"], "nope.x"),
           ([w, p, "--temperature=hot"], "temperature"),
           ([w, p], f"{work}/data/tokenizer.model"),
           ([p, f"--hf_checkpoint={tmp_path}/nonexistent"], f"{tmp_path}/nonexistent"),
           ([f"--workdir={tmp_path}/nonexistent", p], f"{tmp_path}/nonexistent/config.json"),
           ([w, p, "extra"], "extra")]
  _assert_one_named_error(_drive("bipe_jax.generate", cases, tmp_path), cases)


def test_overrides_give_the_config_built_in_python():
  """The tiny config written as --config.KEY=VALUE flags parses back to the same values."""
  _, overrides = cli.split_overrides(["prog", *cli_args(tiny_config())[1:]])
  parsed = config_lib.flat_keys(cli.apply_overrides(quickstart.get_config(), overrides))
  expected = config_lib.flat_keys(tiny_config())
  lists = {k for k, v in expected.items() if isinstance(v, tuple)}   # cli_args skips them
  assert {k: v for k, v in parsed.items() if k not in lists} == {
      k: v for k, v in expected.items() if k not in lists}
  c = quickstart.get_config()
  cli.apply_overrides(c, [("eval.lengths", "64,128"), ("segmentation.separator_ids", "(13, 869)"),
                          ("pe.release_padding_row", "yes"), ("train.lr", "3e-4"),
                          ("mesh.shape", "data=2,tensor=4"), ("segmentation.cot_delimiter", "")])
  assert c.eval.lengths == (64, 128) and c.segmentation.separator_ids == (13, 869)
  assert c.pe.release_padding_row is True and c.train.lr == 3e-4
  assert c.mesh.shape == "data=2,tensor=4" and c.segmentation.cot_delimiter == ""
  with pytest.raises(config_lib.ConfigError, match=r"--config.train.steps='1e3' is not an "
                     r"integer; e\.g\. --config.train.steps=300"):
    cli.apply_overrides(c, [("train.steps", "1e3")])


def test_damaged_token_cache_is_rebuilt_and_named(tmp_path, capsys):
  c = tiny_config()
  first = pipeline.prepare(c, str(tmp_path))
  data = tmp_path / "data"
  expected = {a: np.array(getattr(first, a)) for a in pipeline._ARRAYS}
  del first
  damage = [("train_tokens.npy", lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2)),
            ("heldout_doc_starts.npy", lambda p: open(p, "w").close()),
            ("meta.json", lambda p: open(p, "w").write('{"fingerprint": '))]
  for name, hurt in damage:
    hurt(str(data / name))
    corpus = pipeline.prepare(c, str(tmp_path))
    printed = capsys.readouterr().out
    assert f"tokenized-data cache in {data} is damaged" in printed, (name, printed)
    assert "tokenizing again" in printed
    for a, want in expected.items():
      np.testing.assert_array_equal(getattr(corpus, a), want, err_msg=f"{a} after {name}")
  pipeline.prepare(c, str(tmp_path))
  assert "damaged" not in capsys.readouterr().out, "a sound cache is reused quietly"


def test_damaged_tokenizer_cache_fails_naming_file_and_fix(tmp_path):
  c = tiny_config()
  pipeline.prepare(c, str(tmp_path))
  (tmp_path / "data" / "tokenizer.json").write_text("{")
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/data/tokenizer.json is damaged")
                     + r".*delete .*data to train the tokenizer"):
    pipeline.prepare(c, str(tmp_path))


def test_glob_names_what_it_skips(tmp_path, caplog):
  (tmp_path / "a.txt").write_text("text")
  os.makedirs(tmp_path / "dir.txt")
  os.symlink(tmp_path / "gone", tmp_path / "broken.txt")
  with caplog.at_level("WARNING"):
    assert sources.list_files(f"{tmp_path}/*.txt") == [f"{tmp_path}/a.txt"]
  text = caplog.text
  assert "matches 1 directory, skipped" in text and f"{tmp_path}/dir.txt" in text
  assert "matches 1 dangling symlink, skipped" in text and f"{tmp_path}/broken.txt" in text
  caplog.clear()
  shutil.rmtree(tmp_path / "dir.txt")
  os.remove(tmp_path / "broken.txt")
  sources.list_files(f"{tmp_path}/*.txt")
  assert "skipped" not in caplog.text
