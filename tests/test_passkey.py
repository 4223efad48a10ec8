"""Passkey retrieval: prompt construction, scoring, and models with hand-set weights
whose retrieval behaviour is known in advance."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from bipe_jax import decode, positions
from bipe_jax.model import Decoder, ModelConfig
from bipe_jax.tasks import passkey


def _ids(tok, text):
  return [int(t) for t in tok.encode(text)]


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_key_sits_at_the_stated_depth(code_tokenizer, depth):
  tok = code_tokenizer
  length = 400
  ex = passkey.make_example(tok, length, depth, "4071")
  ids = list(ex.ids)
  assert len(ids) == length and ids[0] == tok.bos_id
  intro = 1 + len(_ids(tok, passkey.INTRO))
  before = _ids(tok, passkey.KEY_BEFORE)
  sentence = len(before + _ids(tok, "4071") * 2 + _ids(tok, passkey.KEY_BETWEEN)
                 + _ids(tok, passkey.KEY_AFTER))
  question = _ids(tok, passkey.QUESTION)
  n_filler = length - intro - sentence - len(question)
  # The filler tokens before the key are round(depth * all filler tokens).
  assert ex.key_start - intro == round(depth * n_filler)
  assert ids[ex.key_start:ex.key_start + len(before)] == before
  assert ids[-len(question):] == question
  key = _ids(tok, "4071")
  assert [ids[i] for i in ex.key_tokens] == key * 2
  # What surrounds the key is filler text only (decoded, it is FILLER repeated).
  filler_text = tok.decode(ids[intro:ex.key_start] + ids[ex.key_start + sentence:-len(question)])
  assert filler_text and (passkey.FILLER * 20).startswith(filler_text[:len(passkey.FILLER)])
  assert tok.decode(ids[ex.key_start:ex.key_start + sentence]).startswith("The pass key is 4071.")
  with pytest.raises(ValueError, match="too short"):
    passkey.make_example(tok, 50, 0.5, "1")


def test_score():
  assert passkey.score("4071. Remember", "4071")
  assert not passkey.score("40712", "4071")
  assert not passkey.score(" is the key", "4071")
  assert not passkey.score("12 4071", "4071")


def _copy_model(tok, kind, **kw):
  """One layer whose single head, from any non-digit token, attends to digit tokens
  (the key: the only digits in a passkey prompt) and copies the digit; after a
  digit it emits '.'. Embedding dims: 0-9 digit one-hot, 10 "is a digit", 11
  constant; attention writes the copied digit into dims 12-21, which the head
  reads out above the constant's small vote for '.'."""
  digits = [_ids(tok, str(i)) for i in range(10)]
  assert all(len(d) == 1 for d in digits), digits
  digits = [d[0] for d in digits]
  stop = _ids(tok, ".")[0]
  v, d = tok.vocab_size, 32
  cfg = ModelConfig(vocab_size=v, d_model=d, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=8,
                    pe_kind=kind, max_positions=64, attention_impl="reference", **kw)
  model = Decoder(cfg)
  z = np.zeros((1, 4), np.int32)
  p = jax.tree.map(np.zeros_like, nn.meta.unbox(model.init(
      jax.random.key(0), dict(tokens=z, intra=z, inter=z, positions=z, doc_ids=z))["params"]))
  p["embed"][:, 11] = 1.0
  for i, t in enumerate(digits):
    p["embed"][t, i] = p["embed"][t, 10] = 1.0
  layer = p["layer_0"]
  for norm in (layer["attn_norm"], layer["mlp_norm"], p["final_norm"]):
    norm["scale"][:] = 1.0
  a = layer["attn"]
  a["q"]["kernel"][11, 0, 0], a["q"]["kernel"][10, 0, 0] = 10.0, -10.0
  a["k"]["kernel"][10, 0, 0] = 1.0
  for i in range(10):
    a["v"]["kernel"][i, 0, i] = 1.0
    a["o"]["kernel"][0, i, 12 + i] = 1.0
    p["lm_head"][12 + i, digits[i]] = 1.0
  p["lm_head"][10, stop] = 10.0
  p["lm_head"][11, stop] = 0.5  # '.' unless a digit was copied with weight

  return model, jax.tree.map(jax.numpy.asarray, p)


def _generator(tok, model):
  rule = positions.PositionRule(np.zeros(tok.vocab_size, bool), None, tok.bos_id, False)
  return decode.Generator(model, rule, pad_id=tok.pad_id)


def test_a_model_that_copies_scores_by_where_it_can_see(code_tokenizer):
  tok = code_tokenizer
  depths, lengths = (0.0, 0.5, 1.0), (320, 640)
  # Without positions it finds the key anywhere.
  model, params = _copy_model(tok, "none")
  rows = passkey.accuracy(_generator(tok, model), params, tok, lengths, depths, trials=2,
                          digits=1, log=lambda *_: None)
  assert [r["accuracy"] for r in rows] == [1.0] * len(rows), rows
  # With an ALiBi slope of 0.5 per token against a key score of 32.7 it sees the
  # key only within about 60 tokens of the question: depth 1, never depth 0 or 0.5.
  model, params = _copy_model(tok, "alibi", alibi_multiplier=128.0)
  rows = passkey.accuracy(_generator(tok, model), params, tok, lengths[:1], depths, trials=2,
                          digits=1, log=lambda *_: None)
  for r in rows:
    ex = passkey.make_example(tok, r["length"], r["depth"], "7")
    distance = r["length"] - 1 - max(ex.key_tokens)
    assert distance < 50 or distance > 90, distance  # clear of the threshold
    assert r["accuracy"] == (1.0 if distance < 50 else 0.0), (r, distance)
  assert [r["accuracy"] for r in rows] == [0.0, 0.0, 1.0]
