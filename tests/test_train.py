"""End-to-end training on a small real corpus: learning, checkpoints, resume, errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bipe_jax import checkpoint, evaluate, train
from bipe_jax import config as config_lib
from tiny import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  out = train.train(tiny_config(), workdir)
  return workdir, out


def test_loss_falls(trained):
  _, out = trained
  losses = out["losses"]
  assert sorted(losses) == list(range(1, 41)), "every step's loss is recorded once"
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
  assert last < first - 1.0, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"


def test_logs_written(trained):
  workdir, _ = trained
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [10, 20, 30, 40]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_restore_gives_identical_eval_loss(trained):
  workdir, _ = trained
  config = evaluate.load_config(workdir)
  from bipe_jax.data import pipeline
  corpus = pipeline.prepare(config, workdir)
  # Same step restored twice through orbax, and the in-memory state of a
  # second identical run: all three must score the held-out blocks identically.
  trainer, state = evaluate.restore_params(config, workdir, corpus.vocab_size, step=40)
  rows_a = evaluate.perplexities(trainer, state.params, config, corpus, (32,), 1024, 1024, log=lambda s: None)
  _, state_b = evaluate.restore_params(config, workdir, corpus.vocab_size, step=40)
  rows_b = evaluate.perplexities(trainer, state_b.params, config, corpus, (32,), 1024, 1024, log=lambda s: None)
  assert rows_a[0]["nll"] == rows_b[0]["nll"]
  leaves_a = jax.tree.leaves(state.params)
  leaves_b = jax.tree.leaves(state_b.params)
  assert all(np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b))
  assert int(state.step) == 40


def test_resume_continues_from_saved_step(trained, tmp_path):
  workdir, full = trained
  # Copy the finished run, drop its last checkpoint (step 40) and start the
  # same command again: it must resume at step 21 from checkpoint 20, with
  # the data iterator restored, and reproduce the uninterrupted losses.
  part = str(tmp_path / "part")
  shutil.copytree(workdir, part)
  shutil.rmtree(os.path.join(part, "checkpoints", "40"))
  assert checkpoint.latest_step(part) == 20
  resumed = train.train(tiny_config(), part)
  assert sorted(resumed["losses"]) == list(range(21, 41)), "resumed run must start right after the checkpoint"
  np.testing.assert_allclose([resumed["losses"][s] for s in range(21, 41)],
                             [full["losses"][s] for s in range(21, 41)], rtol=1e-5)


def test_evaluate_writes_table_json_and_plot(trained, capsys):
  workdir, _ = trained
  result = evaluate.evaluate(workdir, lengths=(32, 64))
  out = capsys.readouterr().out
  assert "unigram perplexity" in out and "perplexity" in out
  assert [r["length"] for r in result["results"]] == [32, 64]
  # 40 steps take the model far below a uniform guess over the 320 pieces.
  assert result["results"][0]["ppl"] < 320 / 2
  assert os.path.getsize(os.path.join(workdir, "eval.png")) > 1000


def test_other_model_shape_in_workdir_fails(trained):
  workdir, _ = trained
  c = tiny_config()
  c.model.d_model = 128
  with pytest.raises(checkpoint.CheckpointError, match="d_model: saved 64 vs configured 128"):
    train.train(c, workdir)


@pytest.mark.parametrize("key,value,message", [
    ("pe.kind", "bipe_rop", "invalid pe.kind='bipe_rop'; valid: "),
    ("data.packing", "pack", "invalid data.packing='pack'; valid: windows, documents"),
    ("train.schedule", "linear", "invalid train.schedule='linear'; valid: polynomial, cosine"),
])
def test_invalid_choice_names_key_and_valid_values(key, value, message):
  c = tiny_config()
  section, name = key.split(".")
  setattr(getattr(c, section), name, value)
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
    config_lib.validate(c)


def test_unknown_key_in_config_file_fails():
  c = tiny_config()
  c.train.lr_peak = 1.0
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'train.lr_peak'"):
    config_lib.validate(c)


def test_cli_unknown_override_fails_before_work(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bipe_jax.train", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}/w", "--config.train.foo=1"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert proc.returncode == 2
  assert "unknown config key 'train.foo'; keys under 'train': " in proc.stderr
  assert not os.path.exists(tmp_path / "w"), "nothing may be written before the config is checked"


def test_saved_config_from_an_older_version_loads_with_defaults(tmp_path):
  """config.json lacking keys added later loads (they take defaults); unknown keys fail."""
  from bipe_jax.configs import base
  saved = base.get_config().to_dict()
  saved["eval"]["lengths"] = [64, 128]          # JSON lists, a value that differs from base
  saved["pe"]["kind"] = "bipe_alibi"
  del saved["pe"]["fire_hidden"], saved["attention"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = evaluate.load_config(str(tmp_path))
  assert list(config.eval.lengths) == [64, 128] and config.pe.kind == "bipe_alibi"
  assert config.pe.fire_hidden == base.get_config().pe.fire_hidden
  assert config.attention.impl == "auto"
  config_lib.validate(config)
  saved["train"]["made_up"] = 1
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match="train.made_up"):
    evaluate.load_config(str(tmp_path))
