"""A trained run stretched after the fact: pe.rope_scaling at evaluation time through
bipe-eval's --config overrides, and fine-tuning at a longer length with --init_from.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from bipe_jax import evaluate, train, trainer
from test_cli import _assert_one_named_error, _drive
from tiny import cli_args, tiny_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny BiPE-RoPE run: 4 steps at 32 tokens, a checkpoint at step 4."""
  workdir = str(tmp_path_factory.mktemp("source"))
  c = tiny_config(steps=4)
  c.train.checkpoint_every = 4
  train.train(c, workdir)
  return workdir


def _eval(workdir, *overrides):
  return evaluate.evaluate(workdir, lengths=(64,), overrides=list(overrides))


def test_scaling_at_evaluation_time_changes_only_the_rotation(source):
  plain = _eval(source)
  scaled = _eval(source, ("pe.rope_scaling.kind", "yarn"), ("pe.rope_scaling.factor", "4"))
  unit = _eval(source, ("pe.rope_scaling.kind", "ntk"), ("pe.rope_scaling.factor", "1"))
  nll = lambda r: [x["nll"] for x in r["results"]]
  # Factor 1 reproduces the plain evaluation bit for bit, so any difference is
  # the scaling reaching the model (a 4-step model barely uses positions).
  assert nll(unit) == nll(plain)
  assert np.isfinite(nll(scaled)).all() and nll(scaled) != nll(plain)
  assert scaled["rope_scaling"]["kind"] == "yarn" and plain["rope_scaling"]["kind"] == "none"
  with open(os.path.join(source, "config.json")) as f:   # the saved config is untouched
    assert json.load(f)["pe"]["rope_scaling"]["kind"] == "none"


def test_eval_and_train_command_lines(source, tmp_path):
  """The documented command works; bad scaling and --init_from values exit 2 naming them."""
  w = f"--workdir={source}"
  good = [([w, "--lengths=64", "--config.pe.rope_scaling.kind=yarn",
            "--config.pe.rope_scaling.factor=4"], "")]
  results = _drive("bipe_jax.evaluate", good, tmp_path)
  assert results[0]["code"] == 0, results[0]["stderr"][-2000:] + results[0]["traceback"]
  bad_eval = [([w, "--config.pe.rope_scaling.kind=yarm"], "pe.rope_scaling.kind"),
              ([w, "--config.pe.rope_scaling.factor=0.5"], "pe.rope_scaling.factor"),
              ([w, "--config.pe.rope_scaling.factor=abc"], "pe.rope_scaling.factor"),
              ([w, "--config.pe.rope_scaling.kind=linear", "--config.pe.kind=bipe_alibi"],
               "pe.kind='bipe_alibi' rotates nothing"),
              ([w, "--config.model.d_ff=96"], "layer_0/mlp/down/kernel")]
  _assert_one_named_error(_drive("bipe_jax.evaluate", bad_eval, tmp_path), bad_eval)

  args = cli_args(tiny_config(steps=2))
  new = f"--workdir={tmp_path}/new"
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  shutil.copy(os.path.join(source, "config.json"), no_ckpt / "config.json")
  bad_train = [
      ([*args, new, f"--init_from={tmp_path}/missing"], f"{tmp_path}/missing/config.json"),
      ([*args, new, f"--init_from={no_ckpt}"], "holds no checkpoint"),
      ([*args, f"--workdir={source}", f"--init_from={source}"], "is the --workdir itself"),
      ([*args, new, "--init_from="], "--init_from"),
      ([*args, new, f"--init_from={source}", f"--config.train.init_from={source}"],
       "--init_from and --config.train.init_from"),
      ([*args, new, f"--init_from={source}", "--config.model.d_ff=96"],
       "params/layer_0/mlp/down/kernel: saved (128, 64) vs configured (96, 64)"),
  ]
  _assert_one_named_error(_drive("bipe_jax.train", bad_train, tmp_path), bad_train)
  assert not os.path.exists(no_ckpt / "checkpoints")  # a source is only read


def test_init_from_loads_params_only_and_trains_at_a_longer_length(source, tmp_path):
  _, saved = evaluate.restore_params(evaluate.load_config(source), source, 320)
  saved = jax.device_get(saved.params)
  c = tiny_config(steps=3)
  c.data.seq_len, c.pe.max_intra = 64, 32   # twice the length; the intra table keeps its shape
  c.train.lr, c.train.warmup_steps = 1e-3, 1
  c.pe.rope_scaling.kind, c.pe.rope_scaling.factor = "yarn", 2.0
  c.train.init_from = source
  first, seen = [], []
  real = trainer.Trainer.step

  def step(self, state, batch, key):
    if not first:   # copied before the step donates it
      first.append(jax.device_get(state))
    seen.append(batch["tokens"].shape)
    return real(self, state, batch, key)
  new = str(tmp_path / "new")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(trainer.Trainer, "step", step)
    out = train.train(c, new)
  start = first[0]
  assert int(start.step) == 0
  jax.tree.map(np.testing.assert_array_equal, start.params, saved)
  adam = start.opt_state[1][0]
  assert int(adam.count) == 0
  for moments in (adam.mu, adam.nu):
    assert all(not np.any(x) for x in jax.tree.leaves(moments))
  assert seen == [(8, 64)] * 3 and out["step"] == 3
  assert all(np.isfinite(v) for v in out["losses"].values())
  with open(os.path.join(new, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["tokenizer"]["model"] == os.path.join(source, "data", "tokenizer.model")
  assert cfg["pe"]["rope_scaling"]["original_length"] == 32   # the source's seq_len
  assert cfg["train"]["init_from"] == source
  # Starting again resumes the new run; the source is not read again.
  c.train.steps = 4
  assert train.train(c, new)["step"] == 4
