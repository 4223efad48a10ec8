"""What the evaluation scores: the unigram baseline sees exactly the model's
targets, and padding the last batch changes no number but saves compilations."""
import collections
import math
import types

import jax
import numpy as np
import pytest

from bipe_jax import evaluate
from bipe_jax.data import pipeline
from bipe_jax.trainer import Trainer
from tiny import tiny_config

V, BOS, SEP = 16, 1, 3
# Four documents, each after a BOS; cut into blocks of 4 targets (BIPE_METHOD:
# non-overlapping, remainder dropped) they give, with "documents" packing
# (a target that starts the next document is masked):
#   [1 5 6 5 | 1]   -> 5 6 5      [1 7 7 1 | 8]  -> 7 7 8
#   [8 5 6 9 | 1]   -> 5 6 9      [1 10 5 5 | 7] -> 10 5 5 7
STREAM = np.array([1, 5, 6, 5, 1, 7, 7, 1, 8, 5, 6, 9, 1, 10, 5, 5, 7], np.int32)
SCORED_AT_4 = [5, 6, 5, 7, 7, 8, 5, 6, 9, 10, 5, 5, 7]


def _corpus():
  table = np.zeros(V, bool)
  table[SEP] = True
  return pipeline.Corpus(tokenizer=types.SimpleNamespace(bos_id=BOS, vocab_size=V),
                         is_separator=table, train_tokens=STREAM, heldout_tokens=STREAM,
                         train_doc_starts=np.flatnonzero(STREAM == BOS),
                         heldout_doc_starts=np.flatnonzero(STREAM == BOS))


def _config(packing):
  c = tiny_config()
  c.data.packing, c.data.seq_len, c.pe.max_intra = packing, 8, 8
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.d_ff = 64
  return c


def _unigram_by_hand(tokens) -> float:
  n = len(tokens)
  return math.exp(-sum(c / n * math.log(c / n) for c in collections.Counter(tokens).values()))


@pytest.fixture(scope="module")
def evaluated():
  """Perplexities at lengths 2, 4, 8 with 12 tokens per batch (batches of 6+2,
  3+1 and 1+1 blocks), counting how often the evaluation step is traced."""
  traces = []
  real = Trainer.eval_loss

  def counted(self, params, batch):
    traces.append(batch["tokens"].shape)
    return real(self, params, batch)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(Trainer, "eval_loss", counted)
    config = _config("documents")
    trainer = Trainer(config, V)
    params = trainer.init(jax.random.key(0)).params
    rows = evaluate.perplexities(trainer, params, config, _corpus(), (2, 4, 8), 0, 12,
                                 log=lambda s: None)
  return config, trainer, params, rows, traces


def test_unigram_scores_the_models_targets_by_hand(evaluated):
  _, _, _, rows, _ = evaluated
  at4 = rows[1]
  assert at4["length"] == 4 and at4["tokens"] == len(SCORED_AT_4)
  assert at4["unigram_ppl"] == pytest.approx(_unigram_by_hand(SCORED_AT_4), rel=1e-12)
  # The BOS targets the loss mask drops would change it.
  assert _unigram_by_hand(STREAM[1:]) != pytest.approx(at4["unigram_ppl"], rel=1e-3)


def test_windows_packing_scores_every_target():
  config, corpus = _config("windows"), _corpus()
  targets = np.concatenate([b["targets"][b["loss_mask"] > 0]
                            for b in evaluate.full_batches(config, corpus, 4, 0, 12)])
  np.testing.assert_array_equal(targets, STREAM[1:])


def test_padded_last_batch_changes_nothing_and_compiles_once_per_length(evaluated):
  config, trainer, params, rows, traces = evaluated
  assert traces == [(6, 2), (3, 4), (1, 8)], traces
  logits = jax.jit(lambda p, b: trainer.model.apply({"params": p}, b))
  for row in rows:
    nll, count = 0.0, 0
    for b in pipeline.eval_batches(config, _corpus(), row["length"], 0, 12):
      logp = np.asarray(jax.nn.log_softmax(logits(params, b)), np.float64)
      picked = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
      nll -= (picked * b["loss_mask"]).sum()
      count += int(b["loss_mask"].sum())
    assert row["tokens"] == count
    assert row["nll"] == pytest.approx(nll / count, rel=1e-5)
