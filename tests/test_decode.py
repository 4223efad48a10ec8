"""Cached decoding (bipe_jax.decode): the oracle is the full forward pass.

Every kind: the logits of prefill + one-token steps equal those of one forward
pass over the same tokens, with ids from the pipeline's numpy functions, for
left-padded prompts crossing segment and document boundaries and running past
the training length. Then sampling, batching and stop tokens.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bipe_jax import decode, encodings, positions
from bipe_jax.encodings import rope_scaling
from bipe_jax.model import Decoder, ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
V, BOS = 23, 1
SEPS = (3, 7, 11)
MAX_INTRA, TRAIN_LEN = 6, 16


def _table():
  t = np.zeros(V, bool)
  t[list(SEPS)] = True
  return t


def _rule(restart=True):
  return positions.PositionRule(_table(), MAX_INTRA, BOS, restart)


def _model(kind, impl="reference", **kw):
  # Weights of std 0.5, not 0.02: scores then vary by several units, so attention
  # is sharp and every position and mask shows in the logits.
  kw = {"init_std": 0.5, **kw}
  cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    pe_kind=kind, max_intra=MAX_INTRA, max_positions=TRAIN_LEN,
                    max_random_position=64, fire_init_threshold=4.0, attention_impl=impl, **kw)
  model = Decoder(cfg)
  z = np.zeros((1, 8), np.int32)
  levels = np.zeros((1, max(cfg.levels - 2, 0), 8), np.int32)
  params = model.init(jax.random.key(0), dict(tokens=z, intra=z, inter=z, positions=z,
                                              doc_ids=z, levels=levels))["params"]
  params = nn.meta.unbox(params)
  for j in range(1, cfg.levels - 1):  # level tables start at zero; give them values to check
    table = params["intra"][f"level_{j}"]
    params["intra"][f"level_{j}"] = kw["init_std"] * jax.random.normal(jax.random.key(j), table.shape)
  return model, params


def full_ids(seq_BT, restart=True):
  """The pipeline's ids of whole rows (documents start at BOS when restart)."""
  seq_BT = np.asarray(seq_BT)
  doc = np.cumsum(seq_BT == BOS, axis=1) if restart else np.zeros_like(seq_BT)
  intra, inter = positions.bilevel_ids(seq_BT, _table(), MAX_INTRA,
                                       doc_ids=doc if restart else None)
  return dict(tokens=seq_BT.astype(np.int32), intra=intra, inter=inter,
              positions=positions.flat_positions(doc), doc_ids=doc.astype(np.int32))


def _sequences():
  """Two prompts (24 and 13 tokens) and 12 forced tokens each: separators every
  few tokens, a BOS inside the prompt and inside the continuation."""
  p0 = [BOS, 5, 6, 3, 8, 9, 2, 7, 4, 4, 4, 4, 4, 4, 4, 4, 11, 5, BOS, 6, 3, 9, 12, 3]
  p1 = [BOS, 13, 14, 7, 15, 16, 17, 18, 19, 20, 21, 3, 9]
  f0 = [5, 3, 6, BOS, 8, 7, 9, 10, 11, 12, 14, 3]
  f1 = [2, 2, 2, 2, 2, 2, 2, 2, 7, BOS, 5, 11]
  return [np.array(p0), np.array(p1)], np.array([f0, f1])


def test_sequences_cross_segments_documents_and_the_training_length():
  prompts, forced = _sequences()
  for p, f in zip(prompts, forced):
    ids = full_ids(np.concatenate([p, f])[None])
    assert len(p) + len(f) > TRAIN_LEN
    assert ids["doc_ids"].max() - ids["doc_ids"].min() >= 1  # a document starts inside
    assert np.sum(np.isin(f, SEPS)) >= 2 and np.sum(np.isin(p, SEPS)) >= 2
    assert (np.diff(ids["positions"][0]) < 0).any()
  assert max(full_ids(np.concatenate([prompts[0], forced[0]])[None])["inter"][0]) >= 2


def _tables(rule):
  return jax.tree.map(jax.numpy.asarray, rule.tables())


def test_step_ids_equal_pipeline_ids_and_bilevel_state():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (3, 40)).astype(np.int32)
  tokens[:, 0] = BOS
  tokens[1, [9, 25]] = BOS
  for restart in (True, False):
    # Row 2 is left-padded by 5: its ids must be those of the unpadded row.
    valid = np.ones_like(tokens, bool)
    valid[2, :5] = False
    rule = _rule(restart)
    ids, _ = positions.row_ids(positions.IdState.start(3), tokens, valid, _tables(rule), rule,
                               decode.PAD_DOC)
    for b in range(3):
      want = full_ids(tokens[b:b + 1, 5 if b == 2 else 0:], restart)
      for name in ("intra", "inter", "positions"):
        got = np.asarray(ids[name])[b][valid[b]]
        np.testing.assert_array_equal(got, want[name][0], err_msg=f"{name} restart={restart}")
      doc = np.asarray(ids["doc_ids"])[b]
      assert (doc[~valid[b]] == decode.PAD_DOC).all()
      np.testing.assert_array_equal(np.diff(doc[valid[b]]) != 0, np.diff(want["doc_ids"][0]) != 0)
  # One document, no clipping: the state after each token is BilevelState's.
  rule = positions.PositionRule(_table(), None, BOS, False)
  state, ref = positions.IdState.start(1), positions.BilevelState()
  for tok in tokens[0]:
    _, state = positions.step_ids(state, jax.numpy.asarray([tok]), jax.numpy.asarray([True]),
                                  _tables(rule), rule)
    ref = ref.advance(bool(_table()[tok]))
    assert (int(state.counts[0, 0]), int(state.counts[1, 0])) == (ref.intra, ref.inter)


def _three_levels():
  """Lines end at "\n" pieces and "." ends a sentence (level 1); a blank line
  ends a block (level 2): piece 3 "\n", 11 "\n\n", 13 "x\n", 12 " "."""
  texts = [f"w{i}" for i in range(V)]
  texts[3], texts[7], texts[11], texts[12], texts[13] = "\n", ".", "\n\n", " ", "x\n"
  finest = np.array(["\n" in t or t == "." for t in texts])
  return positions.LevelSeparators.from_texts(3, texts, finest)


def level_batch(seq_BT, seps, bounds, restart=True):
  """The pipeline's ids of whole rows with K levels (positions.level_ids)."""
  seq_BT = np.asarray(seq_BT)
  doc = np.cumsum(seq_BT == BOS, axis=1) if restart else None
  ids = positions.level_ids(seps.classes(seq_BT, doc), seps.levels, bounds, doc)
  doc = np.zeros_like(seq_BT) if doc is None else doc
  return dict(tokens=seq_BT.astype(np.int32), intra=ids[0], inter=ids[-1],
              levels=ids[1:-1].transpose(1, 0, 2), positions=positions.flat_positions(doc),
              doc_ids=doc.astype(np.int32))


def test_step_ids_equal_level_ids_with_blank_lines_and_level_state():
  seps, bounds = _three_levels(), (MAX_INTRA, 3)
  rng = np.random.default_rng(1)
  tokens = rng.choice([3, 3, 3, 11, 12, 12, 13, 7, 5, 6, 8, BOS], (2, 60)).astype(np.int32)
  tokens[:, 0] = BOS
  classes = seps.classes(tokens)
  assert (classes == 2).sum() >= 4 and (classes == 1).sum() >= 8   # blank lines and lines
  for restart in (True, False):
    rule = positions.PositionRule(seps, bounds, BOS, restart)
    ids, _ = positions.row_ids(positions.IdState.start(2, 3), tokens, np.ones_like(tokens, bool),
                               _tables(rule), rule)
    want = level_batch(tokens, seps, bounds, restart)
    for name in ("intra", "inter", "levels", "positions"):
      np.testing.assert_array_equal(np.asarray(ids[name]), want[name], err_msg=name)
  rule = positions.PositionRule(seps, None, BOS, False)
  state, ref = positions.IdState.start(1, 3), positions.LevelState.start(3)
  for tok in tokens[0]:
    _, state = positions.step_ids(state, jax.numpy.asarray([tok]), jax.numpy.asarray([True]),
                                  _tables(rule), rule)
    ref = ref.step(int(tok), seps)
    assert tuple(int(c) for c in state.counts[:, 0]) == ref.counts


def test_cached_logits_equal_full_forward_with_three_levels():
  seps, bounds = _three_levels(), (MAX_INTRA, 3)
  model, params = _model("bipe_rope", levels=3, max_level_ids=(3,))
  prompts = [np.array([BOS, 5, 3, 11, 6, 7, 12, 3, 13, 8, 11, 9, 5, 3]), np.array([BOS, 3, 11, 5])]
  forced = np.array([[5, 11, 12, 3, 6, 7, 13, BOS, 3, 11], [6, 3, 3, 12, 11, 8, 7, 5, 13, 3]])
  rule = positions.PositionRule(seps, bounds, BOS, True)
  out = decode.Generator(model, rule)(params, prompts, forced.shape[1], forced=forced,
                                      keep_logits=True)
  seqs = np.stack([np.concatenate([p, f, np.zeros(len(prompts[0]) - len(p), int)])
                   for p, f in zip(prompts, forced)])
  batch = level_batch(seqs, seps, bounds)
  assert batch["levels"].max() >= 2 and batch["inter"].max() >= 2
  full = np.asarray(model.apply({"params": params}, batch))
  width = out.prefill_logits.shape[1]
  for b, p in enumerate(prompts):
    got = np.concatenate([out.prefill_logits[b, width - len(p):], out.logits[b, 1:]])
    np.testing.assert_allclose(got, full[b, :len(p) + forced.shape[1] - 1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(encodings.KINDS))
def test_cached_logits_equal_full_forward(kind):
  # The dense kernel compiles fastest; the 8-device test runs the blockwise one.
  _assert_cached_equals_full(*_model(kind), kind)


def test_yarn_scaling_applies_to_cached_decoding():
  """pe.rope_scaling reaches decoding through the encoding's own code (YaRN: the
  frequency ramp and the attention temperature)."""
  model, params = _model("bipe_rope", rope_scaling=rope_scaling.RopeScaling("yarn", 4.0, 4))
  _assert_cached_equals_full(model, params, "yarn")
  plain = _model("bipe_rope")[0]
  args = params, full_ids(_sequences()[1])
  assert np.abs(model.apply({"params": args[0]}, args[1])
                - plain.apply({"params": args[0]}, args[1])).max() > 1e-3


def _assert_cached_equals_full(model, params, what):
  prompts, forced = _sequences()
  out = decode.Generator(model, _rule())(params, prompts, forced.shape[1], forced=forced,
                                         keep_logits=True)
  n = forced.shape[1]
  seqs = np.stack([np.concatenate([p, f, np.zeros(len(prompts[0]) - len(p), int)])
                   for p, f in zip(prompts, forced)])
  full = np.asarray(model.apply({"params": params}, full_ids(seqs)))
  width = out.prefill_logits.shape[1]
  for b, p in enumerate(prompts):
    got = np.concatenate([out.prefill_logits[b, width - len(p):], out.logits[b, 1:]])
    np.testing.assert_allclose(got, full[b, :len(p) + n - 1], atol=2e-5, rtol=1e-5,
                               err_msg=f"{what} row {b}")
    np.testing.assert_array_equal(out.tokens[b], forced[b])


def test_greedy_is_deterministic_and_a_batch_equals_each_prompt_alone():
  model, params = _model("bipe_rope")
  # Ids run on across BOS here, so only the padding's document id hides it.
  gen = decode.Generator(model, _rule(restart=False))
  prompts, _ = _sequences()
  prompts = prompts + [np.array([BOS, 4, 3, 9])]
  batch = gen(params, prompts, 10)
  again = gen(params, prompts, 10)
  for b, p in enumerate(prompts):
    alone = gen(params, [p], 10)
    np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
    np.testing.assert_array_equal(batch.tokens[b], again.tokens[b])
  # Streaming in chunks of 3 gives the same tokens, delivered in order.
  parts = []
  chunked = gen(params, prompts, 10, chunk=3, on_tokens=parts.append)
  assert [p.shape[1] for p in parts] == [3, 3, 3, 1]
  for b in range(len(prompts)):
    np.testing.assert_array_equal(chunked.tokens[b], batch.tokens[b])
    np.testing.assert_array_equal(np.concatenate([p[b] for p in parts]), batch.tokens[b])


def test_sampling_is_reproducible_per_seed():
  model, params = _model("bipe_alibi")
  gen = decode.Generator(model, _rule())
  prompts, _ = _sequences()
  s = decode.Sampling(temperature=1.0, top_k=10, top_p=0.95)
  a, b = gen(params, prompts, 12, s, seed=3), gen(params, prompts, 12, s, seed=3)
  c = gen(params, prompts, 12, s, seed=4)
  for x, y in zip(a.tokens, b.tokens):
    np.testing.assert_array_equal(x, y)
  assert any((x != y).any() for x, y in zip(a.tokens, c.tokens))
  # top_k = 1 leaves one token: the greedy one.
  greedy, top1 = gen(params, prompts, 12), gen(params, prompts, 12, decode.Sampling(1.0, 1), 5)
  for x, y in zip(top1.tokens, greedy.tokens):
    np.testing.assert_array_equal(x, y)


def test_top_k_and_top_p_draw_only_from_their_sets():
  logits = np.log(np.tile(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]], np.float32), (400, 1)))
  draw = lambda s: set(np.asarray(decode.sample(logits, jax.random.key(0), s)).tolist())
  assert draw(decode.Sampling(1.0, top_k=2)) == {1, 3}
  # Nucleus: 0.4, then 0.3 (0.4 < 0.75), then 0.15 (0.7 < 0.75); 0.85 >= 0.75 stops.
  assert draw(decode.Sampling(1.0, top_p=0.75)) == {1, 3, 4}
  assert draw(decode.Sampling(1.0)) == {0, 1, 2, 3, 4}
  with pytest.raises(ValueError, match="top_p"):
    decode.Sampling(1.0, top_p=0.0)


def test_stop_tokens_end_a_row_and_the_rest_go_on():
  model, params = _model("rope")
  gen = decode.Generator(model, _rule())
  prompts, _ = _sequences()
  free = gen(params, prompts, 12)
  stop = int(free.tokens[0][4])
  first = int(np.flatnonzero(free.tokens[0] == stop)[0])
  out = gen(params, prompts, 12, stop_tokens=[stop])
  np.testing.assert_array_equal(out.tokens[0], free.tokens[0][:first])
  assert out.stopped[0]
  hits = np.flatnonzero(free.tokens[1] == stop)
  np.testing.assert_array_equal(out.tokens[1], free.tokens[1][:hits[0]] if len(hits)
                                else free.tokens[1])


def test_on_eight_devices(tmp_path):
  """Mesh data=2, tensor=4 in a subprocess: logits equal one device's full forward,
  parameters and the KV cache split over batch rows and heads."""
  out = tmp_path / "multi.json"
  proc = subprocess.run([sys.executable, os.path.join(HERE, "decode_multidevice.py"), str(out)],
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                            [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 8
  assert result["three_rows"] == {"equal": True, "rows": 3, "decode_tokens_after_stop": 3}
  for kind in sorted(encodings.KINDS):
    r = result[kind]
    # The single-device test's float32 tolerance (sums over heads split across
    # devices add in another order).
    assert r["max_abs_err"] < 2e-5 + 1e-5 * r["max_abs_logit"], (kind, r)
    assert r["q_shard"] == [32, 1, 8], r          # heads 4 over tensor=4
    b, s, k, d = r["k_cache"]
    assert r["k_cache_shard"] == [b // 2, s, k // 4, d], r
