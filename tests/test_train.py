"""End-to-end training on a small real corpus: learning, checkpoints, progress lines, errors."""
import contextlib
import glob
import io
import json
import os
import re
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipe_jax import checkpoint, evaluate, train, trainer
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline
from tiny import STDLIB, tiny_config


SAVED = (20, 40)   # tiny_config: checkpoint_every 20, 40 steps


def _train_watching_steps(config, workdir, after_step):
  """train.train, calling after_step(n, state) after the n-th step of this run."""
  real, calls = trainer.Trainer.step, [0]

  def step(self, state, batch, key):
    new, metrics = real(self, state, batch, key)
    calls[0] += 1
    after_step(calls[0], new)
    return new, metrics
  with pytest.MonkeyPatch.context() as m:
    m.setattr(trainer.Trainer, "step", step)
    return train.train(config, workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, result, {step: the in-memory state saved at that step, on the host})."""
  workdir = str(tmp_path_factory.mktemp("run"))
  saved = {}

  def keep(n, state):
    if n in SAVED:   # copied before the next step donates the buffers
      saved[n] = jax.device_get(state)
  out = _train_watching_steps(tiny_config(), workdir, keep)
  return workdir, out, saved


def test_loss_falls(trained):
  _, out, _ = trained
  losses = out["losses"]
  assert sorted(losses) == list(range(1, 41)), "every step's loss is recorded once"
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
  assert last < first - 1.0, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"


def test_logs_written(trained):
  workdir, _, _ = trained
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [10, 20, 30, 40]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_restore_returns_the_state_that_was_saved(trained):
  """Params, optimizer state and step restored from each checkpoint equal, bit for
  bit, the state training held in memory when it saved; so do their eval losses."""
  workdir, _, saved = trained
  config = evaluate.load_config(workdir)
  corpus = pipeline.prepare(config, workdir)
  for step in SAVED:
    restored, state = evaluate.restore_params(config, workdir, corpus.vocab_size, step=step)
    want = saved[step]
    assert int(state.step) == step == int(want.step)
    assert jax.tree.structure(state) == jax.tree.structure(want)
    for (path, got), w in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(got), w, err_msg=f"step {step}: "
                                    f"{jax.tree_util.keystr(path)} differs from the saved state")
  nll = lambda params: evaluate.perplexities(restored, params, config, corpus, (32,), 1024, 1024,
                                             log=lambda s: None)[0]["nll"]
  in_memory = jax.device_put(saved[SAVED[-1]].params, restored.param_sharding)
  assert nll(state.params) == nll(in_memory)


@pytest.fixture(scope="module")
def progress(trained, tmp_path_factory):
  """A short run that prints a progress line every step, on a clock that
  advances one second per step. Its documents are short paragraphs packed
  whole ("documents"), so rows hold padding and masked document starts.

  Returns (config, workdir, {step: (printed tok/s, printed lr)}).
  """
  workdir = str(tmp_path_factory.mktemp("progress"))
  source = os.path.join(workdir, "paragraphs.jsonl")
  with open(source, "w") as f:
    for path in sorted(glob.glob(os.path.join(STDLIB, "json", "*.py"))):
      for text in open(path, encoding="utf-8").read().split("\n\n"):
        f.write(json.dumps({"text": text}) + "\n")
  c = tiny_config(steps=8)
  c.data.source, c.data.packing = source, "documents"
  c.tokenizer.model = os.path.join(trained[0], "data", "tokenizer.model")
  c.train.log_every, c.train.warmup_steps, c.train.checkpoint_every = 1, 3, 100
  clock = [0.0]

  def tick(n, state):
    clock[0] += 1.0
  fake_time = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time)
                                       if not n.startswith("_")})
  fake_time.time = lambda: clock[0]
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out):
    m.setattr(train, "time", fake_time)
    _train_watching_steps(c, workdir, tick)
  lines = re.findall(r"^step (\d+)/8 \| loss \S+ \| ([\d,]+) tok/s \| lr (\S+) ",
                     out.getvalue(), re.M)
  printed = {int(s): (float(r.replace(",", "")), float(lr)) for s, r, lr in lines}
  assert sorted(printed) == list(range(1, 9)), out.getvalue()
  return c, workdir, printed


def test_progress_line_prints_the_lr_its_step_used(progress):
  """Each step's printed lr equals the one the optimizer applied in that step,
  read off its update: for a constant gradient Adam's normalised step is 1, so
  on a vector (no weight decay there) each update is exactly -lr."""
  c, _, printed = progress
  tx = trainer.make_optimizer(c.train)
  p = jnp.zeros(1)
  opt_state, used = tx.init(p), []
  for _ in range(c.train.steps):
    update, opt_state = tx.update(jnp.full(1, 0.5), opt_state, p)
    used.append(-float(update[0]))
  for step, (_, lr) in printed.items():
    assert lr == pytest.approx(used[step - 1], rel=6e-3, abs=1e-12), (step, lr, used)
  assert used[0] == 0.0 and used[1] > 0, "warm-up starts at 0: the first step must print 0"


def test_progress_line_counts_only_tokens_with_a_loss(progress):
  """tok/s: loss-mask tokens of the step's batch (not padding) per second."""
  c, workdir, printed = progress
  batches = pipeline.train_iterator(c, pipeline.prepare(c, workdir))
  for step in range(1, c.train.steps + 1):
    mask = next(batches)["loss_mask"]
    assert printed[step][0] == mask.sum(), (step, printed[step][0], mask.sum())
  assert min(r for r, _ in printed.values()) < c.train.batch_size * c.data.seq_len


def test_evaluate_writes_table_json_and_plot(trained, capsys):
  workdir, _, _ = trained
  result = evaluate.evaluate(workdir, lengths=(32, 64))
  out = capsys.readouterr().out
  assert "unigram perplexity" in out and "perplexity" in out
  assert [r["length"] for r in result["results"]] == [32, 64]
  # 40 steps take the model far below a uniform guess over the 320 pieces.
  assert result["results"][0]["ppl"] < 320 / 2
  assert os.path.getsize(os.path.join(workdir, "eval.png")) > 1000


def test_other_model_shape_in_workdir_fails(trained):
  workdir, _, _ = trained
  c = tiny_config()
  c.model.d_model = 128
  with pytest.raises(checkpoint.ShapeMismatch, match=r"params/embed: saved \(320, 64\) vs configured \(320, 128\)"):
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
