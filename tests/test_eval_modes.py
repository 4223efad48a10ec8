"""Sliding-window perplexity and per-position loss against the block evaluation and numpy."""
import math
import types

import jax
import numpy as np
import pytest

from bipe_jax import eval_modes, evaluate
from bipe_jax.data import pipeline
from bipe_jax.trainer import Trainer
from tiny import tiny_config

V = 400


def _corpus(n_tokens=700, packing="windows"):
  """Held-out stream of distinct ids (a token's value is its stream index), BOS = 1."""
  rng = np.random.default_rng(0)
  table = rng.random(V) < 0.1
  stream = np.arange(n_tokens, dtype=np.int32) % V
  corpus = types.SimpleNamespace(heldout_tokens=stream, is_separator=table, separators=table,
                                 tokenizer=types.SimpleNamespace(bos_id=1))
  c = tiny_config()
  c.data.packing = packing
  c.eval.max_tokens, c.eval.batch_tokens = 0, 256
  return c, corpus


def test_stride_equal_to_window_is_the_block_evaluation():
  c, corpus = _corpus()
  for window in (32, 64, 100):
    a = list(eval_modes.sliding_batches(c, corpus, window, window, 0, 256))
    b = list(pipeline.eval_batches(c, corpus, window, 0, 256))
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  # max_tokens limits both the same way.
  a = list(eval_modes.sliding_batches(c, corpus, 32, 32, 100, 64))
  b = list(pipeline.eval_batches(c, corpus, 32, 100, 64))
  assert [x["tokens"].shape for x in a] == [x["tokens"].shape for x in b]


@pytest.mark.parametrize("window,stride", [(32, 8), (64, 24), (50, 1), (40, 40)])
def test_every_scored_token_has_the_stated_context(window, stride):
  c, corpus = _corpus(n_tokens=300)
  stream = corpus.heldout_tokens
  scored = []
  for batch in eval_modes.sliding_batches(c, corpus, window, stride, 0, 512):
    for row_tokens, row_targets, row_mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
      start = int(row_tokens[0])  # distinct ids: the first token is the window's offset
      np.testing.assert_array_equal(row_tokens, stream[start:start + window])
      for j in np.flatnonzero(row_mask):
        # Target j is predicted from the window's tokens 0..j: j + 1 tokens of context.
        assert j + 1 >= window - stride, (j, window, stride)
        assert row_targets[j] == stream[start + j + 1]
        scored.append(start + j + 1)
  # Scored targets tile the stream from the first full context, each once.
  first = window - stride + 1
  assert scored == list(range(first, first + len(scored)))
  assert len(stream) - 1 - scored[-1] < stride
  min_context = min(j + 1 for j in range(window) if j >= window - stride)
  assert min_context == window - stride + 1


def test_stride_larger_than_a_length_fails_early():
  with pytest.raises(ValueError, match="--stride=65 must be between 1 and the shortest"):
    eval_modes.check(65, (64, 128))
  eval_modes.check(None, (64,))
  eval_modes.check(64, (64, 128))


@pytest.fixture(scope="module")
def model():
  c, corpus = _corpus()
  c.eval.max_tokens, c.eval.batch_tokens = 0, 128
  trainer = Trainer(c, V)
  params = trainer.init(jax.random.key(0)).params
  return c, corpus, trainer, params


def test_sliding_and_per_position_against_block_evaluation(model):
  c, corpus, trainer, params = model
  rows = evaluate.perplexities(trainer, params, c, corpus, (32, 64), 0, 128, log=lambda *_: None)
  same = eval_modes.sliding_perplexities(trainer, params, c, corpus, (32, 64), 32, log=lambda *_: None)
  for r, s in zip(rows, same[:1]):
    assert s["tokens"] == r["tokens"] and s["window"] == 32 and s["min_context"] == 1
    assert math.isclose(s["nll"], r["nll"], rel_tol=1e-6)
  assert same[1]["min_context"] == 33 and same[1]["stride"] == 32

  for length in (32, 64):
    pp = eval_modes.per_position_loss(trainer, params, c, corpus, length)
    # numpy reference: every block through model.apply, log-softmax by hand.
    n = (len(corpus.heldout_tokens) - 1) // length
    blocks = np.stack([corpus.heldout_tokens[i * length:i * length + length + 1] for i in range(n)])
    batch = pipeline.make_batch(blocks, corpus.is_separator, c.pe.max_intra)
    logits = np.asarray(trainer.model.apply({"params": params}, batch), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    assert pp["blocks"] == n and len(pp["mean_nll"]) == length
    np.testing.assert_allclose(pp["mean_nll"], nll.mean(0), rtol=2e-5)
    block_nll = next(r["nll"] for r in rows if r["length"] == length)
    assert math.isclose(np.mean(pp["mean_nll"]), block_nll, rel_tol=1e-5)
