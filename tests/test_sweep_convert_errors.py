"""Bad or unusual input to launch/sweep.py, bipe-convert (both ways) and bipe-train --init_from:
exit 2 with one `error: ...` line naming the problem, and nothing already saved is overwritten.
"""
import os
import shutil

import pytest

from bipe_jax import config as config_lib
from bipe_jax import warm_start
from bipe_jax.interop import export
from test_cli import _assert_one_named_error, _drive
from test_export import _config, _workdir
from test_sweep import sweep
from tiny import cli_args, tiny_config


def _snapshot(root) -> dict:
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, code_tokenizer):
  """A tiny bipe_rope work dir (config.json + a checkpoint at step 3) and its vocab size."""
  path = tmp_path_factory.mktemp("trained") / "run"
  _workdir(path, _config("bipe_rope", code_tokenizer), code_tokenizer.vocab_size)
  return path


def _sweep_file(tmp_path, name, body) -> str:
  # A base config that does not exist: were a bad sweep file accepted, its runs fail at
  # once (instead of training) and the test still fails, quickly.
  path = tmp_path / f"{name}.py"
  path.write_text("import ml_collections\n\ndef get_config():\n"
                  "  s = ml_collections.ConfigDict()\n  s.base = 'configs/no_such.py'\n"
                  f"  s.root = {str(tmp_path / 'runs')!r}\n{body}  return s\n")
  return str(path)


def test_bad_sweep_files_exit_2_naming_the_file_or_axis(tmp_path, capsys):
  syntax = tmp_path / "syntax.py"
  syntax.write_text("import ml_collections\ndef get_config(:\n  pass\n")
  no_fn = tmp_path / "no_fn.py"
  no_fn.write_text("X = 1\n")
  axis = "  s.product = (('pe.kind', ('rope', 'alibi')),)\n"
  cases = [
      (str(syntax), "syntax.py' line 2"),
      (str(no_fn), "get_config"),
      # ("rope") is the string "rope", not a 1-tuple: it must not become runs r, o, p, e.
      (_sweep_file(tmp_path, "str_axis", "  s.product = (('pe.kind', ('rope')),)\n"),
       "sweep axis 'pe.kind'"),
      (_sweep_file(tmp_path, "int_axis", "  s.product = (('seed', (0)),)\n"), "sweep axis 'seed'"),
      (_sweep_file(tmp_path, "flat", "  s.product = ('pe.kind', ('rope', 'alibi'))\n"),
       "sweep product"),
      (_sweep_file(tmp_path, "overrides", axis + "  s.overrides = (('train.steps', 4), 'x')\n"),
       "sweep overrides"),
      (_sweep_file(tmp_path, "eval_args", axis + "  s.eval_args = '--stride=64'\n"),
       "sweep eval_args"),
  ]
  wrong = []
  for path, names in cases:
    for extra in ([], ["--print"]):
      try:
        code = sweep.main([path, *extra])
      except Exception as e:  # pylint: disable=broad-except
        code = f"{type(e).__name__}: {e}"
      out, err = capsys.readouterr()
      lines = err.splitlines()
      if not (code == 2 and not out and len(lines) == 1 and lines[0].startswith("error: ")
              and names in lines[0]):
        wrong.append(f"{os.path.basename(path)} {extra} -> {code!r}, stdout {out[:200]!r}, "
                     f"stderr {err[-300:]!r}")
  assert not wrong, "\n".join(wrong)
  assert not (tmp_path / "runs").exists()


def test_export_never_overwrites_what_is_in_to_hf(tmp_path, run_dir):
  before = _snapshot(run_dir)
  mine = tmp_path / "mine"    # a directory of the user's that holds a config.json
  mine.mkdir()
  (mine / "config.json").write_text('{"mine": 1}')
  (mine / "notes.txt").write_text("keep")
  cases = [([f"--to_hf={run_dir}", f"--workdir={run_dir}"], f"{run_dir}/config.json"),
           ([f"--to_hf={mine}", f"--workdir={run_dir}"], f"{mine}/config.json already exists")]
  _assert_one_named_error(_drive("bipe_jax.convert", cases, tmp_path), cases)
  assert _snapshot(run_dir) == before, "the run's own files were changed"
  assert _snapshot(mine) == {"config.json": b'{"mine": 1}', "notes.txt": b"keep"}
  # A directory holding other files only is fine: nothing of them is touched.
  out = tmp_path / "other"
  out.mkdir()
  (out / "notes.txt").write_text("keep")
  export.export(str(run_dir), str(out))
  assert (out / "notes.txt").read_text() == "keep"
  assert sorted(os.listdir(out)) == sorted(("notes.txt",) + export.WRITTEN)


def test_import_never_overwrites_a_run_in_workdir(tmp_path, run_dir):
  hf = export.export(str(run_dir), str(tmp_path / "hf"))
  user_run = tmp_path / "user_run"
  shutil.copytree(run_dir, user_run)
  runs_before, hf_before = _snapshot(user_run), _snapshot(hf)
  cases = [([f"--hf_checkpoint={hf}", f"--workdir={user_run}"], f"--workdir={user_run}"),
           ([f"--hf_checkpoint={hf}", f"--workdir={hf}"], f"--workdir={hf}")]  # the release
  _assert_one_named_error(_drive("bipe_jax.convert", cases, tmp_path), cases)
  assert _snapshot(user_run) == runs_before, "the user's run was changed"
  assert _snapshot(hf) == hf_before, "the release dir was changed"
  # A release without its tokenizer: later commands would train another one.
  no_tok = tmp_path / "no_tok"
  shutil.copytree(hf, no_tok)
  os.remove(no_tok / "tokenizer.model")
  cases = [([f"--hf_checkpoint={no_tok}", f"--workdir={tmp_path / 'fresh'}"], "tokenizer.model")]
  _assert_one_named_error(_drive("bipe_jax.convert", cases, tmp_path), cases)
  assert not (tmp_path / "fresh").exists()
  # An existing empty directory is a new work dir.
  empty = tmp_path / "empty"
  empty.mkdir()
  ok = [([f"--hf_checkpoint={hf}", f"--workdir={empty}"], "")]
  result = _drive("bipe_jax.convert", ok, tmp_path)[0]
  assert result["code"] == 0, result["stderr"][-2000:] + result["traceback"]
  assert sorted(os.listdir(empty / "checkpoints")) == ["0"]


def test_init_from_does_not_resume_another_run_in_workdir(tmp_path, code_tokenizer):
  """--workdir holding checkpoints of a run not started from --init_from is left as it is."""
  c = tiny_config(steps=4)
  c.tokenizer.model = code_tokenizer.model_path
  source, other = tmp_path / "source", tmp_path / "other"
  _workdir(source, c, code_tokenizer.vocab_size)
  shutil.copytree(source, other)     # the user's own run, same shapes, trained from scratch
  before = _snapshot(other)
  cases = [([*cli_args(tiny_config(steps=4)), f"--workdir={other}", f"--init_from={source}"],
            f"--workdir={other} already holds a run")]
  _assert_one_named_error(_drive("bipe_jax.train", cases, tmp_path), cases)
  assert _snapshot(other) == before, "the other run was resumed or rewritten"
  # The run --init_from started resumes: its config.json names the source.
  fine_tune = tmp_path / "fine_tune"
  c.train.init_from = str(source) + "/"
  _workdir(fine_tune, c, code_tokenizer.vocab_size)
  again = tiny_config(steps=4)
  again.train.init_from = str(source)
  warm_start.prepare(again, str(fine_tune))
  with pytest.raises(config_lib.ConfigError, match="already holds a run"):
    warm_start.prepare(again, str(other))
