"""pe.levels = 3 end to end: the pipeline's level arrays through windows and
packing, separators from tokenizer pieces, config errors, and training of every
relative kind.

Ids are checked row by row against the plain-Python oracles of test_levels.py.
"""
import itertools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipe_jax import config as config_lib
from bipe_jax import decode, encodings, positions, trainer
from bipe_jax.configs import base
from bipe_jax.data import levels as data_levels, pipeline
from bipe_jax.interop import export
from bipe_jax.model import Decoder, ModelConfig
from bipe_jax.positions import LevelSeparators, bilevel_ids
from test_levels import FINEST, TEXTS, oracle_class, oracle_ids
from tiny import tiny_config, train_losses

BOS = 0


def _corpus(levels=3, n=3000, seed=0):
  """A token stream over the toy vocabulary of test_levels, BOS before each document."""
  rng = np.random.default_rng(seed)
  p = np.array([0, 3, 2, 2, 1, 4, 2, 2, 2, 1, 3, 1], float)
  stream = rng.choice(len(TEXTS), n, p=p / p.sum()).astype(np.int32)
  stream[rng.random(n) < 0.015] = BOS  # documents longer than a row: chunks start mid-document
  stream[0] = BOS
  starts = np.flatnonzero(stream == BOS)
  seps = LevelSeparators.from_texts(levels, TEXTS, FINEST)
  return pipeline.Corpus(
      tokenizer=types.SimpleNamespace(bos_id=BOS, vocab_size=len(TEXTS), pad_id=1),
      is_separator=seps.is_separator, separators=seps, train_tokens=stream,
      heldout_tokens=stream, train_doc_starts=starts, heldout_doc_starts=starts)


def _want(tokens, docs, levels, bounds):
  """[K, L] ids of one row from the text oracle (classes) and the nesting oracle (ids)."""
  classes = []
  for t in range(len(tokens)):
    first = t
    while first > 0 and docs[first - 1] == docs[t]:
      first -= 1
    classes.append(oracle_class([TEXTS[i] for i in tokens[first:t + 1]], levels))
  return oracle_ids(classes, levels, bounds, docs)


def _check(batch, bounds):
  levels = 2 + batch["levels"].shape[1]
  for r in range(len(batch["tokens"])):
    want = _want(list(batch["tokens"][r]), list(batch["doc_ids"][r]), levels, bounds)
    np.testing.assert_array_equal(batch["intra"][r], want[0])
    np.testing.assert_array_equal(batch["levels"][r], want[1:-1])
    np.testing.assert_array_equal(batch["inter"][r], want[-1])


def _config(packing, levels=3):
  c = base.get_config()
  c.data.packing, c.data.seq_len, c.train.batch_size = packing, 48, 4
  c.pe.levels, c.pe.max_intra, c.pe.max_level_ids = levels, 6, (3,) * (levels - 2)
  return c


@pytest.mark.parametrize("packing", ["windows", "documents"])
def test_train_iterator_carries_levels(packing):
  c, corpus = _config(packing), _corpus()
  restarts = 0
  for b in itertools.islice(pipeline.train_iterator(c, corpus), 10):
    assert b["levels"].shape == (4, 1, 48) and b["levels"].dtype == np.int32
    _check(b, (6, 3))
    restarts += int((np.diff(b["doc_ids"], axis=1) != 0).sum())
    assert (b["levels"][:, 0] == 2).any(), "clipping at pe.max_level_ids reached"
  assert packing == "windows" or restarts > 0, "packed rows hold several documents"
  for b in itertools.islice(pipeline.eval_batches(c, corpus, 96, 0, 400), 2):
    _check(b, (6, 3))


def test_make_batch_restarts_every_level_at_document_starts():
  # Documents start mid-text (no BOS), often right after a newline of the
  # previous one: a blank line must not reach across the document start.
  corpus, rng = _corpus(), np.random.default_rng(5)
  rows = rng.choice(np.arange(1, len(TEXTS)), (8, 41))
  docs = np.cumsum(rng.random(rows.shape) < 0.15, axis=1)
  _check(pipeline.make_batch(rows, corpus.separators, (6, 3), docs), (6, 3))


def test_two_levels_are_todays_batches():
  corpus = _corpus(levels=2)
  rows = np.asarray(corpus.train_tokens[:4 * 33]).reshape(4, 33)
  docs = np.cumsum(rows == BOS, axis=1)
  got = pipeline.make_batch(rows, corpus.separators, 5, docs)
  assert "levels" not in got
  intra, inter = bilevel_ids(rows[:, :-1], corpus.is_separator, 5, docs[:, :-1])
  np.testing.assert_array_equal(got["intra"], intra)
  np.testing.assert_array_equal(got["inter"], inter)


def test_tokenizer_separators(tmp_path):
  from bipe_jax.data.tokenizer import train_tokenizer
  text = "def f():\n    return 1\n\n\nx = 2\ny = 3\n\nprint(x)\n" * 40
  tok = train_tokenizer([text], str(tmp_path / "t"), 300)
  seps = data_levels.separators(tok, 3, "code")
  np.testing.assert_array_equal(seps.is_separator, tok.separator_table("code"))
  ids = tok.encode(text[:52])
  cls = seps.classes(ids)
  texts = tok.piece_texts()
  want = [oracle_class([texts[i] for i in ids[:t + 1]], 3) for t in range(len(ids))]
  np.testing.assert_array_equal(cls, want)
  assert (cls == 2).sum() == 2, "two blank-line runs in the first 52 characters"
  explicit = data_levels.separators(tok, 3, "code", level_separator_ids="5,6;7")
  np.testing.assert_array_equal(np.flatnonzero(explicit.piece_class), [5, 6, 7])
  assert explicit.piece_class[7] == 2
  with pytest.raises(ValueError, match="outside the vocabulary"):
    data_levels.separators(tok, 3, "code", level_separator_ids="5;999")


def test_level_without_separators_is_named(tmp_path):
  source = tmp_path / "flat.txt"
  source.write_text("a = 1\nb = a + 2\nprint(b)\n" * 300)  # lines, never a blank one
  c = tiny_config(kind="bipe_rope", levels=3)
  c.data.source, c.data.cache_dir, c.data.heldout_fraction = str(source), str(tmp_path), 0.0
  c.tokenizer.vocab_size = 280
  with pytest.raises(ValueError, match=r"no separator of level 2 \(1 blank line in a row\)"):
    pipeline.prepare(c, str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"pe.kind": "rope", "pe.levels": 3}, "pe.levels=3 needs a bilevel kind"),
    ({"pe.levels": 1}, "pe.levels=1 must be an integer >= 2"),
    ({"pe.levels": 3, "pe.max_level_ids": (4, 4)}, "pe.max_level_ids=.4, 4. must be empty"),
    ({"pe.levels": 3, "segmentation.level_separator_ids": "13"}, "needs|must hold"),
    ({"pe.levels": 3, "segmentation.level_separator_ids": "a;b"}, "comma-separated"),
    ({"pe.levels": 3, "segmentation.level_separator_ids": "1;2",
      "segmentation.separator_ids": (3,)}, "not both"),
    ({"pe.levels": 3, "data.source": "arithmetic"}, "a third level never ends"),
])
def test_config_errors_name_the_key(change, message):
  c = tiny_config()
  for key, value in change.items():
    section, name = key.split(".")
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


# Training ------------------------------------------------------------------------

V, L, B, STEPS = 32, 16, 8, 30
LINE, BLANK = 1, 2


def _toy_batches() -> dict:
  """[STEPS, B, L] three-level batches from one periodic stream: a fixed order
  of ids 3..V-1 with a line end after every third and a blank line after every
  second line, so each next token follows from the ones before it."""
  rng = np.random.default_rng(0)
  cycle = []
  for i, t in enumerate(rng.permutation(np.arange(3, V))):
    cycle += [t, LINE] if i % 3 == 2 else [t]
    cycle += [BLANK] if i % 6 == 5 else []
  stream = np.tile(cycle, 2 * L // len(cycle) + 2)
  seps = LevelSeparators(3, np.array([0, 1, 2] + [0] * (V - 3)))
  starts = rng.integers(0, len(cycle), (STEPS, B))
  steps = [pipeline.make_batch(np.stack([stream[s:s + L + 1] for s in row]), seps, (L, 8))
           for row in starts]
  return {k: np.stack([b[k] for b in steps]) for k in steps[0]}


def _small_config(kind, steps=STEPS):
  c = tiny_config(steps=steps, kind=kind, levels=3, max_intra=L, max_level_ids=(8,))
  c.data.seq_len = L
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.d_ff = 64
  c.train.batch_size, c.train.lr, c.train.warmup_steps = B, 1e-2, 5
  c.pe.max_random_position = 4 * L
  return c


def _losses(kind, batches) -> np.ndarray:
  c = _small_config(kind)
  model = Decoder(ModelConfig.from_config(c, V))
  tx = trainer.make_optimizer(c.train)

  def check(params):
    assert params["intra"]["level_1"].shape == (8, 32)
  return train_losses(model, tx, batches, STEPS, check)


BILEVEL_KINDS = sorted(k for k, e in encodings.KINDS.items() if e.bilevel)


def test_the_bilevel_kinds_are_every_relative_kind():
  assert {f"bipe_{k}" for k, e in encodings.KINDS.items()
          if e.relative is not None and not e.bilevel} == set(BILEVEL_KINDS)


@pytest.mark.parametrize("kind", BILEVEL_KINDS)
def test_every_relative_kind_trains_with_three_levels(kind):
  batches = _toy_batches()
  assert (batches["levels"] > 0).any() and (batches["inter"] > 0).any()
  losses = _losses(kind, batches)
  assert np.isfinite(losses).all(), (kind, losses)
  first, last = losses[:5].mean(), losses[-5:].mean()
  assert last < 0.5 * first, f"{kind}: loss did not fall: {first:.3f} -> {last:.3f}"


def test_inner_level_tables_are_summed_into_the_embedding():
  batch = jax.tree.map(lambda x: x[0], _toy_batches())
  for intra in ("learned", "sinusoidal"):
    c = _small_config("bipe_rope")
    c.pe.intra, c.pe.max_level_ids = intra, (2,)  # level-1 ids 2 clip to the last row
    m = ModelConfig.from_config(c, V)
    mod = encodings.InputEmbedding(m.encoding, m.pe_params, m.intra_params, m.d_model)
    var = nn.meta.unbox(mod.init(jax.random.key(1), batch))
    level1 = np.minimum(batch["levels"][:, 0], 1)
    if intra == "learned":
      p = var["params"] = dict(var["params"])
      p["level_1"] = jax.random.normal(jax.random.key(2), p["level_1"].shape)  # starts at zero
      want = np.asarray(p["table"])[batch["intra"]] + np.asarray(p["level_1"])[level1]
    else:
      assert not var
      # No table to clip: the pipeline clips the ids (make_batch's bounds).
      want = (encodings.sinusoidal(batch["intra"], m.d_model) +
              encodings.sinusoidal(batch["levels"][:, 0], m.d_model))
    assert (batch["levels"][:, 0] >= 2).any(), "some ids clip"
    np.testing.assert_allclose(mod.apply(var, batch), want, rtol=1e-6, atol=1e-6)


def test_level_table_changes_the_output():
  """The level-1 ids reach the model: shifting them changes the logits."""
  batches = _toy_batches()
  batch = jax.tree.map(lambda x: x[0], batches)
  model = Decoder(ModelConfig.from_config(_small_config("bipe_alibi"), V))
  params = nn.meta.unbox(model.init(jax.random.key(0), batch))
  intra = params["params"]["intra"]
  intra["level_1"] = jax.random.normal(jax.random.key(1), intra["level_1"].shape)  # starts at zero
  shifted = {**batch, "levels": (batch["levels"] + 1) % 8}
  apply = jax.jit(model.apply)
  assert not np.allclose(apply(params, batch), apply(params, shifted))


@pytest.mark.parametrize("kind", ["bipe_rope", "bipe_alibi"])
def test_three_levels_start_as_two(kind):
  """The inner level tables start at zero: at initialisation a three-level
  model (same key) gives the two-level model's logits, whatever its level ids."""
  batch = jax.tree.map(lambda x: x[0], _toy_batches())
  assert (batch["levels"] > 0).any()
  c3 = _small_config(kind)
  c2 = _small_config(kind)
  c2.pe.levels, c2.pe.max_level_ids = 2, ()
  two, three = (Decoder(ModelConfig.from_config(c, V)) for c in (c2, c3))
  flat = {k: v for k, v in batch.items() if k != "levels"}
  got = three.apply(three.init(jax.random.key(0), batch), batch)
  want = two.apply(two.init(jax.random.key(0), flat), flat)
  np.testing.assert_array_equal(got, want)


def test_cached_decoding_ids_follow_the_level_oracle():
  """Cached decoding's on-device ids (positions.step_ids, one token at a time)
  for pe.levels=3 equal the text oracle's, document restarts included."""
  c = tiny_config(kind="bipe_rope", levels=3, max_intra=4)
  c.data.packing = "documents"
  corpus = _corpus(3, n=160)
  rule = decode.position_rule(c, corpus.tokenizer, corpus.separators)
  tokens = np.asarray(corpus.train_tokens)[None]
  assert (tokens == BOS).sum() >= 2
  ids, _ = positions.row_ids(positions.IdState.start(1, 3), tokens, np.ones_like(tokens, bool),
                             jax.tree.map(jnp.asarray, rule.tables()), rule)
  _check({k: np.asarray(v) for k, v in dict(tokens=tokens, **ids).items()},
         pipeline.level_bounds(c))


def test_export_refuses_more_levels():
  with pytest.raises(config_lib.ConfigError, match="pe.levels=3 cannot be exported"):
    export.check_exportable(tiny_config(kind="bipe_rope", levels=3))
