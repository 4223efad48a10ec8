"""Decoder with every pe.kind: causality, training signal, config plumbing."""
import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipe_jax import encodings
from bipe_jax.attention import PositionBias
from bipe_jax.data import pipeline
from bipe_jax.encodings import registry
from bipe_jax.encodings.absolute import Intra, Learned
from bipe_jax.encodings.fire import FireRelative
from bipe_jax.model import Decoder, ModelConfig, loss_fn
from configs import quickstart

V, L = 64, 16
KINDS = sorted(encodings.KINDS)


def _cfg(kind, **kw):
  base = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
              pe_kind=kind, max_intra=4, max_positions=L, max_random_position=4 * L,
              fire_init_threshold=4.0, release_padding_row=kind.startswith("bipe"))
  return ModelConfig(**{**base, **kw})


def _batch(rows, is_sep, doc_ids):
  """The pipeline's batch of rows [B, L+1]: inputs rows[:, :-1], targets rows[:, 1:]
  (masked where the target starts another document)."""
  return pipeline.make_batch(np.asarray(rows), is_sep, 4, doc_ids=np.asarray(doc_ids))


def _distinct_tokens():
  """Two rows, every token id used once, separators at a few positions, two
  documents in row 1: the embedding row of a token is the input at its position."""
  rows = np.arange(2 * (L + 1)).reshape(2, L + 1) + 3
  is_sep = np.zeros(V, bool)
  is_sep[rows[0, [2, 3, 7, 12]]] = True
  is_sep[rows[1, [4, 9, 10]]] = True
  doc_ids = np.array([[0] * (L + 1), [0] * 6 + [1] * (L + 1 - 6)])
  return _batch(rows, is_sep, doc_ids)


def _apply(model, params, batch, train):
  return model.apply({"params": params}, batch, train=train, rngs={"positions": jax.random.key(3)})


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_causality(kind):
  """d logits[t] / d input[s] is zero for every s > t (and across documents).

  Randomized kinds are checked in training mode, where positions are drawn.
  """
  model = Decoder(_cfg(kind))
  batch = _distinct_tokens()
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  train = encodings.get(kind).randomized
  w = jax.random.normal(jax.random.key(1), (2, V))
  ts = (4, 9)

  def grad_embed(t):
    out = lambda p: jnp.sum(_apply(model, p, batch, train)[:, t] * w)
    return np.abs(np.asarray(jax.grad(out)(params)["embed"]))
  g_embed = [grad_embed(t) for t in ts]
  for t, g in zip(ts, g_embed):
    g_tok = g[batch["tokens"]].sum(-1)  # [2, L]: gradient wrt the input at each position
    assert not g_tok[:, t + 1:].any(), (
        f"{kind}: output at {t} depends on later tokens "
        f"{np.argwhere(g_tok[:, t + 1:]) + [0, t + 1]}")
    assert g_tok[:, t].all(), f"{kind}: output at {t} ignores its own token"
    if t >= 6:  # row 1: the second document starts at 6
      assert not g_tok[1, :6].any(), f"{kind}: attention crossed a document start"
    else:
      assert g_tok[:, :t].any(), f"{kind}: output at {t} ignores earlier tokens"


@pytest.mark.parametrize("kind", KINDS)
def test_later_tokens_and_separators_do_not_change_earlier_logits(kind):
  """Same check through the pipeline's position ids: rewriting tokens after t,
  separators included, leaves logits at <= t unchanged."""
  rng = np.random.default_rng(0)
  is_sep = np.zeros(V, bool)
  is_sep[[1, 2]] = True
  tokens = rng.integers(3, V, (2, L + 1))
  tokens[:, [3, 6]] = 1
  doc_ids = np.zeros((2, L + 1), np.int32)
  t = 8
  edited = tokens.copy()
  edited[:, t + 1:] = rng.integers(1, V, (2, L - t))
  edited[:, t + 1::2] = 2
  model = Decoder(_cfg(kind))
  a, b = _batch(tokens, is_sep, doc_ids), _batch(edited, is_sep, doc_ids)
  params = model.init(jax.random.key(0), a)["params"]
  train = encodings.get(kind).randomized
  la, lb = _apply(model, params, a, train), _apply(model, params, b, train)
  np.testing.assert_allclose(la[:, : t + 1], lb[:, : t + 1], rtol=1e-5, atol=1e-5,
                             err_msg=f"{kind}: logits at <= {t} changed")
  assert np.abs(np.asarray(la[:, t + 1:] - lb[:, t + 1:])).max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_position_parameters_get_gradients(kind):
  """The loss reaches every learned position parameter (that the loss falls is
  test_kinds_train's)."""
  model = Decoder(_cfg(kind))
  rng = np.random.default_rng(1)
  is_sep = np.zeros(V, bool)
  is_sep[[1, 2]] = True
  batch = _batch(rng.integers(1, 12, (2, L + 1)), is_sep, np.zeros((2, L + 1)))
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  loss = lambda p: loss_fn(_apply(model, p, batch, True), batch["targets"], batch["loss_mask"])[0]
  grads = jax.grad(loss)(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  enc = encodings.get(kind)
  if isinstance(enc.input_term, (Learned, Intra)):
    assert np.abs(grads["intra" if enc.bilevel else "absolute"]["table"]).sum() > 0
  if isinstance(enc.relative, FireRelative):
    fire = grads["layer_0"]["attn"]["pe"]["fire"]
    assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(fire)), f"{kind}: FIRE untrained"


@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_and_dense_attention_equal_reference(kind, monkeypatch):
  """The whole decoder with the blockwise kernel (4x4 tiles over 16 tokens, so
  unmasked, masked and skipped tiles all occur) and with the saved-probability
  kernel (as `auto` runs it on CPU for short sequences; rows of 4 queries) gives
  the dense reference's logits and parameter gradients, for every encoding
  kind. Tile and row sizes come through the model config (attention.block_q/k)."""
  from bipe_jax.attention import chunked, dense
  seen = {"chunked": [], "dense": []}
  real_chunked, real_dense = chunked.attention, dense.attention
  def spy_chunked(*args, **kw):
    seen["chunked"].append((kw.get("block_q"), kw.get("block_k")))
    return real_chunked(*args, **kw)
  def spy_dense(*args, **kw):
    seen["dense"].append(kw.get("row_block"))
    return real_dense(*args, **kw)
  monkeypatch.setattr(chunked, "attention", spy_chunked)
  monkeypatch.setattr(dense, "attention", spy_dense)
  rng = np.random.default_rng(2)
  is_sep = np.zeros(V, bool)
  is_sep[[1, 2]] = True
  batch = _batch(rng.integers(1, 12, (2, L + 1)), is_sep,
                 np.array([[0] * (L + 1), [0] * 5 + [1] * (L + 1 - 5)]))
  out = {}
  for impl in ("reference", "chunked", "dense"):
    model = Decoder(_cfg(kind, attention_impl=impl, n_heads=4, n_kv_heads=2,
                         attention_block_q=4, attention_block_k=4))
    params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
    loss = lambda p: loss_fn(_apply(model, p, batch, True), batch["targets"], batch["loss_mask"])[0]
    out[impl] = (_apply(model, params, batch, True), jax.grad(loss)(params))
  assert seen["chunked"] and set(seen["chunked"]) == {(4, 4)}, seen
  assert seen["dense"] and set(seen["dense"]) == {4}, seen
  for impl in ("chunked", "dense"):
    np.testing.assert_allclose(out[impl][0], out["reference"][0], atol=2e-5, rtol=2e-5,
                               err_msg=f"{kind}, {impl}: logits differ")
    for path, g in jax.tree_util.tree_leaves_with_path(out["reference"][1]):
      np.testing.assert_allclose(_at(out[impl][1], path), g, atol=2e-5, rtol=1e-4,
                                 err_msg=f"{kind}, {impl}: gradient of "
                                 f"{jax.tree_util.keystr(path)} differs")


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_attention_block_sizes_from_config_and_checked():
  from bipe_jax import config as config_lib
  c = quickstart.get_config()
  c.attention.block_q, c.attention.block_k = 128, 64
  m = ModelConfig.from_config(c, vocab_size=100)
  assert (m.attention_block_q, m.attention_block_k) == (128, 64)
  c.attention.block_k = -1
  with pytest.raises(config_lib.ConfigError, match="attention.block_k=-1"):
    config_lib.validate(c)


def test_model_config_from_experiment_config():
  c = quickstart.get_config()
  c.pe.kind = "bipe_alibi"
  m = ModelConfig.from_config(c, vocab_size=100)
  assert (m.pe_kind, m.max_intra, m.d_model, m.max_positions) == ("bipe_alibi", 128, 256, 128)
  assert m.pe_params.alibi_multiplier == 96.0 and m.intra_params.max_intra == 128
  for key in ("xpos_scale_base", "fire_hidden", "release_padding_row"):
    if key in c.pe:  # configs written before a key existed fall back to defaults
      del c.pe[key]
  m = ModelConfig.from_config(c, vocab_size=100)
  assert m.fire_hidden == 32 and m.xpos_scale_base == 512.0 and not m.release_padding_row
  c.pe.kind = "bipe_nope"
  with pytest.raises(ValueError, match="valid kinds"):
    ModelConfig.from_config(c, vocab_size=100)
  with pytest.raises(ValueError, match="multiple of model.n_kv_heads"):
    _cfg("rope", n_kv_heads=3)


@flax.struct.dataclass
class _LogDistanceBias(PositionBias):
  """score[b,h,i,j] -= w[h] log(1 + |pos_i - pos_j|): a bias kind unknown to the package."""
  w_H: jnp.ndarray
  q_pos_BT: jnp.ndarray
  k_pos_BS: jnp.ndarray

  def block(self, q_pos_Bt, k_pos_Bs):
    dist_Bts = jnp.abs(q_pos_Bt[:, :, None] - k_pos_Bs[:, None, :])
    return -self.w_H[None, :, None, None] * jnp.log1p(dist_Bts)[:, None]


class _LogDistanceWeights(nn.Module):
  n_heads: int

  @nn.compact
  def __call__(self, pos_BL):
    w_H = self.param("w", nn.initializers.uniform(1.0), (self.n_heads,))
    pos_BL = pos_BL.astype(jnp.float32)
    return _LogDistanceBias(w_H, pos_BL, pos_BL)


@dataclasses.dataclass(frozen=True)
class _LogDistance(encodings.Relative):
  bias_kind = "other"

  def bias(self, p, pos_BL, n_heads, param_dtype):
    return _LogDistanceWeights(n_heads, name="logdist")(pos_BL)


def test_a_new_kind_needs_no_change_outside_its_own_code(monkeypatch):
  """A relative kind defined here (its part, its bias, one registry entry) runs
  in the decoder with the blockwise kernel exactly as with the dense one, its
  parameters get gradients, and its derived bilevel twin reads inter ids."""
  flat = encodings.Encoding("logdist", "LogDist", "log-distance bias", "-",
                            relative=_LogDistance())
  for enc in (flat, registry._bilevel(flat)):
    monkeypatch.setitem(registry.KINDS, enc.name, enc)
  rng = np.random.default_rng(4)
  is_sep = np.zeros(V, bool)
  is_sep[[1, 2]] = True
  batch = _batch(rng.integers(1, 12, (2, L)), is_sep, np.array([[0] * L, [0] * 5 + [1] * (L - 5)]))
  for kind in ("logdist", "bipe_logdist"):
    out = {}
    for impl in ("reference", "chunked"):
      model = Decoder(_cfg(kind, attention_impl=impl, attention_block_q=4, attention_block_k=4))
      params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
      loss = lambda p: loss_fn(_apply(model, p, batch, True), batch["targets"], batch["loss_mask"])[0]
      out[impl] = (_apply(model, params, batch, True), jax.grad(loss)(params))
    np.testing.assert_allclose(out["chunked"][0], out["reference"][0], atol=2e-5, rtol=2e-5)
    g_ref = out["reference"][1]["layer_0"]["attn"]["pe"]["logdist"]["w"]
    g_chunked = out["chunked"][1]["layer_0"]["attn"]["pe"]["logdist"]["w"]
    assert np.abs(g_ref).sum() > 0, f"{kind}: the new bias got no gradient"
    np.testing.assert_allclose(g_chunked, g_ref, atol=2e-5, rtol=1e-4)
    m = _cfg(kind)
    pos = encodings.attention_positions(m.encoding, m.pe_params, batch, False)
    np.testing.assert_array_equal(pos, batch["inter" if m.encoding.bilevel else "positions"])
