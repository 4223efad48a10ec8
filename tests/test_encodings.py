"""Every pe.kind against an independent numpy implementation of its formula.

Random q/k/v and positions from token sequences with several segments and
several documents per row; rotary scores are checked in their relative
(complex) form, so a layout or sign slip cannot cancel out.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bipe_jax import encodings, positions
from bipe_jax.attention import reference
from bipe_jax.data import pipeline
from bipe_jax.encodings.absolute import Intra
from bipe_jax.encodings.alibi import AlibiRelative
from bipe_jax.encodings.fire import FireParams, FireRelative
from bipe_jax.encodings.xpos import XposRelative
from bipe_jax.model import Decoder, ModelConfig

B, L, H, K, D = 2, 24, 4, 2, 8


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  # Accelerators may default to TF32/bf16 passes; the formulas are compared at 1e-4.
  with jax.default_matmul_precision("float32"):
    yield
SEP_IDS = (1, 2)
KINDS = sorted(encodings.KINDS)


def _cfg(kind, **kw):
  base = dict(vocab_size=32, d_model=H * D, n_layers=1, n_heads=H, n_kv_heads=K,
              d_ff=16, pe_kind=kind, max_intra=6, max_positions=16,
              xpos_scale_base=16.0, max_random_position=64, fire_init_threshold=6.0)
  return ModelConfig(**{**base, **kw})


def _sep_table():
  table = np.zeros(32, bool)
  table[list(SEP_IDS)] = True
  return table


def _data(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 32, (B, L))
  tokens[rng.random((B, L)) < 0.25] = 1
  doc_ids = np.array([[0] * 10 + [1] * 8 + [2] * 6, [0] * 15 + [1] * 9])
  intra, inter = positions.bilevel_ids(tokens, _sep_table(), doc_ids=doc_ids)
  batch = dict(tokens=tokens.astype(np.int32), intra=intra, inter=inter,
               doc_ids=doc_ids.astype(np.int32), positions=positions.flat_positions(doc_ids))
  q = rng.standard_normal((B, L, H, D)).astype(np.float32)
  k = rng.standard_normal((B, L, K, D)).astype(np.float32)
  v = rng.standard_normal((B, L, K, D)).astype(np.float32)
  assert inter.max() >= 3 and len(np.unique(doc_ids[0])) == 3
  return batch, q, k, v


def _ours(kind, q, k, v, batch, train=False, key=None, perturb=0.0, **kw):
  """(scores [B,H,L,L], output [B,L,H,D], pos, fire params) through our code."""
  m = _cfg(kind, **kw)
  enc = m.encoding
  pos = encodings.attention_positions(enc, m.pe_params, batch, train, key)
  module = encodings.RelativeEncoding(enc, m.pe_params, H)
  variables = nn.meta.unbox(module.init(jax.random.key(0), q, k, pos))
  if perturb:
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = tree.unflatten([x + perturb * jax.random.normal(kk, x.shape)
                                for x, kk in zip(leaves, keys)])
  q2, k2, bias = module.apply(variables, q, k, pos)
  scores = jnp.einsum("bthd,bshd->bhts", q2, jnp.repeat(k2, H // K, axis=2)) / math.sqrt(D)
  if bias is not None:
    scores = scores + bias.full()
  doc = batch["doc_ids"]
  out = reference.attention(q2, k2, jnp.asarray(v), q_doc_BT=doc, k_doc_BS=doc, bias=bias)
  fire = variables.get("params", {}).get("fire")
  return np.asarray(scores), np.asarray(out), np.asarray(pos), fire


# ---- numpy, from the papers' formulas ------------------------------------------

def np_slopes(n):
  """ALiBi paper reference: geometric from 2^(-8/n); interleave for non-powers of 2."""
  def pw2(n):
    start = 2 ** (-2 ** -(math.log2(n) - 3))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return pw2(n)
  p = 2 ** math.floor(math.log2(n))
  return pw2(p) + np_slopes(2 * p)[0::2][: n - p]


def np_scores(enc, q, k, pos, m, fire=None):
  """Scores [B,H,L,L] float64 from the formula of `enc` at positions `pos`."""
  q, k = q.astype(np.float64), np.repeat(k, H // K, axis=2).astype(np.float64)
  dist = (pos[:, :, None] - pos[:, None, :]).astype(np.float64)  # i - j, [B,L,L]
  if enc.rotary:  # pair (f, f + D/2) as one complex number, angle ~ i - j
    zq, zk = q[..., : D // 2] + 1j * q[..., D // 2:], k[..., : D // 2] + 1j * k[..., D // 2:]
    theta = m.rope_base ** (-np.arange(D // 2) * 2.0 / D)
    phase = np.exp(1j * dist[:, None, :, :, None] * theta)           # [B,1,L,L,F]
    prod = zq[:, :, None].transpose(0, 3, 1, 2, 4) * np.conj(zk[:, None].transpose(0, 3, 1, 2, 4))
    terms = (prod * phase).real
    if isinstance(enc.relative, XposRelative):
      zeta = (np.arange(D // 2) * 2.0 / D + 0.4) / 1.4
      terms = terms * zeta ** (dist[:, None, :, :, None] / m.xpos_scale_base)
    s = terms.sum(-1)
  else:
    s = np.einsum("bthd,bshd->bhts", q, k)
  s = s / math.sqrt(D)
  if isinstance(enc.relative, AlibiRelative):
    mult = m.alibi_multiplier or (96.0 if enc.bilevel else 1.0)
    s = s - (np.array(np_slopes(H)) * mult)[None, :, None, None] * dist[:, None]
  elif isinstance(enc.relative, FireRelative):
    f = {n: np.asarray(x, np.float64) for n, x in fire.items()}
    psi = lambda x: np.log(np.abs(f["c"] * x) + 1)
    thr = abs(f["threshold_multiplier"] * m.fire_init_threshold)
    x = psi(dist) / (psi(np.maximum(pos, thr))[:, :, None] + 1e-6)
    hid = np.maximum(x[..., None] * f["hidden_kernel"] + f["hidden_bias"], 0)
    s = s + np.einsum("btsw,wh->bhts", hid, f["out_kernel"]) + f["out_bias"][None, :, None, None]
  return s


def np_attention(s, v, doc):
  n = s.shape[-1]
  mask = np.tril(np.ones((n, n), bool))[None] & (doc[:, :, None] == doc[:, None, :])
  s = np.where(mask[:, None], s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", a, np.repeat(v, H // K, axis=2)), mask


@pytest.mark.parametrize("kind", KINDS)
def test_scores_and_output_match_numpy(kind):
  batch, q, k, v = _data()
  m = _cfg(kind)
  enc = m.encoding
  scores, out, pos, fire = _ours(kind, q, k, v, batch, perturb=0.3)
  want_pos = batch["inter"] if enc.bilevel else batch["positions"]
  np.testing.assert_array_equal(pos, want_pos)
  ref = np_scores(enc, q, k, want_pos, m, fire)
  ref_out, mask = np_attention(ref, v, batch["doc_ids"])
  vis = np.broadcast_to(mask[:, None], scores.shape)
  np.testing.assert_allclose(scores[vis], ref[vis], rtol=1e-4, atol=1e-4,
                             err_msg=f"{kind}: attention logits differ from the formula")
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4,
                             err_msg=f"{kind}: attention output differs from numpy")


@pytest.mark.parametrize("kind", ["randomized_rope", "bipe_randomized_rope"])
def test_randomized_training_positions(kind):
  batch, q, k, v = _data()
  m = _cfg(kind)
  key = jax.random.key(7)
  scores, _, pos, _ = _ours(kind, q, k, v, batch, train=True, key=key)
  base = batch["inter"] if m.encoding.bilevel else batch["positions"]
  assert pos.min() >= 0 and pos.max() < m.max_random_position
  for b in range(B):  # order kept, equal ids stay equal, distinct ids stay distinct
    order = np.lexsort((base[b], batch["doc_ids"][b]))
    for i, j in zip(order[:-1], order[1:]):
      if batch["doc_ids"][b, i] == batch["doc_ids"][b, j]:
        assert (pos[b, i] < pos[b, j]) == (base[b, i] < base[b, j])
        assert (pos[b, i] == pos[b, j]) == (base[b, i] == base[b, j])
  assert not np.array_equal(pos, base)
  ref = np_scores(m.encoding, q, k, pos, m)
  _, mask = np_attention(ref, v, batch["doc_ids"])
  vis = np.broadcast_to(mask[:, None], scores.shape)
  np.testing.assert_allclose(scores[vis], ref[vis], rtol=1e-3, atol=1e-3)
  other = _ours(kind, q, k, v, batch, train=True, key=jax.random.key(8))[2]
  assert not np.array_equal(other, pos), "a new key must draw new positions"
  with pytest.raises(ValueError, match="rngs"):
    encodings.attention_positions(m.encoding, m.pe_params, batch, True, None)
  with pytest.raises(ValueError, match="max_random_position"):
    encodings.randomize_positions(key, jnp.zeros((1, 80), jnp.int32), 64)


def test_alibi_slopes():
  got = encodings.alibi_slopes(12, 96.0)
  want = [48, 24, 12, 6, 3, 1.5, 0.75, 0.375, 67.88, 33.94, 16.97, 8.49]
  np.testing.assert_allclose(got, want, atol=6e-3, err_msg="BIPE_METHOD 12 x 96 slopes")
  for n in (1, 2, 3, 5, 6, 8, 12, 16, 20, 24):
    np.testing.assert_allclose(encodings.alibi_slopes(n), np_slopes(n), rtol=1e-6,
                               err_msg=f"ALiBi slopes for {n} heads")
  np.testing.assert_allclose(encodings.alibi_slopes(6),
                             [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


@pytest.mark.parametrize("kind", ["alibi", "bipe_alibi"])
def test_per_key_alibi_equals_full_form_under_causal_mask(kind):
  batch, q, k, v = _data()
  m = _cfg(kind)
  pos = encodings.attention_positions(m.encoding, m.pe_params, batch, False)
  slopes = encodings.alibi_slopes(H, m.pe_params.alibi_multiplier)
  full = encodings.alibi_bias(slopes, pos)
  per_key = encodings.alibi_bias(slopes, pos, per_key=True)
  diff = np.asarray(full.full() - per_key.full())       # -m_h pos[i]: constant per row
  np.testing.assert_allclose(diff, diff[..., :1] * np.ones_like(diff), atol=1e-4)
  run = lambda bias: reference.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         q_doc_BT=batch["doc_ids"],
                                         k_doc_BS=batch["doc_ids"], bias=bias)
  np.testing.assert_allclose(run(full), run(per_key), rtol=1e-5, atol=1e-5)


ROTARY = [k for k in KINDS if encodings.get(k).rotary]


@pytest.mark.parametrize("kind", ROTARY)
@pytest.mark.parametrize("shift", [37, 1000])
def test_rotary_scores_invariant_to_position_shift(kind, shift):
  batch, q, k, v = _data()
  key = "inter" if encodings.get(kind).bilevel else "positions"
  moved = {**batch, key: batch[key] + shift}
  s0, _, _, _ = _ours(kind, q, k, v, batch)
  s1, _, _, _ = _ours(kind, q, k, v, moved)
  np.testing.assert_allclose(s1, s0, rtol=2e-3, atol=2e-3,
                             err_msg=f"{kind}: scores moved with a constant position shift")


BILEVEL_ROTARY = [k for k in ROTARY if encodings.get(k).bilevel]
SEP, BOS = 1, 2


@functools.lru_cache(maxsize=None)
def _logits_fn(kind):
  """Jitted logits(params, batch) of a one-layer Decoder of `kind`; randomized
  kinds run in training mode (positions drawn from a fixed key)."""
  model = Decoder(_cfg(kind))
  train = encodings.get(kind).randomized
  return jax.jit(lambda p, b: model.apply({"params": p}, b, train=train,
                                          rngs={"positions": jax.random.key(5)}))


@functools.lru_cache(maxsize=None)
def _bilevel_params():
  """Parameters every bilevel rope/xpos/alibi decoder of `_cfg` shares (none has its own)."""
  zeros = np.zeros((2, L), np.int32)
  dummy = dict(tokens=zeros, intra=zeros, inter=zeros, positions=zeros, doc_ids=zeros)
  init = jax.jit(Decoder(_cfg("bipe_rope")).init)
  return nn.meta.unbox(init(jax.random.key(0), dummy)["params"])


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_bilevel_rotary_rotates_by_segment_index_not_flat_position(data):
  """A batch as the pipeline makes it (intra, inter and flat positions all set,
  two documents in row 1) through the whole model. Tokens whose document so far
  is one segment see no rotary offset: their logits equal those of the same
  parameters under bipe_alibi, whose bias is zero there. The flat `positions`
  do not matter at all, and the segment index does."""
  rows = np.array(data.draw(st.lists(st.integers(3, 9), min_size=2 * (L + 1),
                                     max_size=2 * (L + 1)))).reshape(2, L + 1)
  for r in range(2):
    rows[r, data.draw(st.lists(st.integers(4, L), max_size=6))] = SEP
  rows[:, 0] = BOS
  rows[1, 14] = BOS
  rows[:, 9] = SEP          # every row has a second segment
  table = np.zeros(32, bool)
  table[SEP] = True
  batch = pipeline.make_batch(rows, table, 6, doc_ids=np.cumsum(rows == BOS, axis=1))
  first = batch["inter"] == 0   # the first segment of each document
  assert (batch["positions"][first] > 0).any() and (~first).any()
  rng = np.random.default_rng(0)
  scrambled = {**batch, "positions": rng.integers(0, 1000, batch["positions"].shape)}
  spread = {**batch, "inter": batch["inter"] * 3}
  params, no_offset = _bilevel_params(), _logits_fn("bipe_alibi")
  for kind in BILEVEL_ROTARY:
    logits = _logits_fn(kind)
    got = np.asarray(logits(params, batch))
    want = np.asarray(no_offset(params, batch))
    np.testing.assert_allclose(got[first], want[first], rtol=1e-5, atol=1e-5,
                               err_msg=f"{kind}: tokens of one segment got a rotary offset")
    np.testing.assert_allclose(np.asarray(logits(params, scrambled)), got, rtol=1e-5, atol=1e-5,
                               err_msg=f"{kind}: logits depend on the flat positions")
    moved = np.abs(np.asarray(logits(params, spread)) - got)[~first]
    assert moved.max() > 1e-4, f"{kind}: logits ignore the segment index"


def test_fire_bias_tiles_equal_the_full_bias():
  """FireBias.block on a tile equals that tile of the full bias (the kernels'
  gradients through FIRE are checked in test_attention)."""
  batch, _, _, _ = _data()
  pos = jnp.asarray(batch["inter"])
  fire = encodings.Fire(H, 8, 0.1, 4.0)
  bias = fire.apply(fire.init(jax.random.key(0), pos), pos)
  full = np.asarray(bias.full())
  tile = np.asarray(bias.block(bias.q_pos_BT[:, 8:16], bias.k_pos_BS[:, 4:12]))
  np.testing.assert_allclose(tile, full[:, :, 8:16, 4:12], rtol=1e-6)
  m = _cfg("bipe_fire")
  assert isinstance(m.encoding.relative, FireRelative) and m.encoding.bilevel


def _input_term(kind, batch, **kw):
  m = _cfg(kind, **kw)
  mod = encodings.InputEmbedding(m.encoding, m.pe_params, m.intra_params, m.d_model)
  variables = nn.meta.unbox(mod.init(jax.random.key(0), batch))
  return m, variables, mod


def np_sinusoidal(pos, d):
  out = np.zeros(pos.shape + (d,))
  for i in range(0, d, 2):
    out[..., i] = np.sin(pos / 10000 ** (i / d))
    out[..., i + 1] = np.cos(pos / 10000 ** (i / d))
  return out


def test_input_terms_match_numpy():
  batch, _, _, _ = _data()
  _, var, mod = _input_term("none", batch)
  assert mod.apply(var, batch) is None and not var
  _, var, mod = _input_term("sinusoidal", batch)
  np.testing.assert_allclose(mod.apply(var, batch), np_sinusoidal(batch["positions"], H * D),
                             atol=1e-5)
  long = {**batch, "positions": batch["positions"] + 5000}  # any length, no table
  np.testing.assert_allclose(mod.apply(var, long), np_sinusoidal(long["positions"], H * D),
                             atol=2e-3)
  m, var, mod = _input_term("learned", batch)
  table = np.asarray(var["params"]["table"])
  np.testing.assert_array_equal(mod.apply(var, batch),
                                table[np.minimum(batch["positions"], m.max_positions - 1)])
  for kind in [k for k in KINDS if encodings.get(k).bilevel]:
    m, var, mod = _input_term(kind, batch)
    table = np.asarray(var["params"]["table"])
    np.testing.assert_array_equal(mod.apply(var, batch), table[np.minimum(batch["intra"], 5)])
    _, var, mod = _input_term(kind, batch, intra="sinusoidal")
    np.testing.assert_allclose(mod.apply(var, batch), np_sinusoidal(batch["intra"], H * D),
                               atol=1e-5)


def test_release_padding_row_is_zero_and_never_trained():
  batch, _, _, _ = _data()
  ids = np.array([[0, 1, 5, 5, 9, 2]], np.int32)  # 9 clips to max_intra - 1 = 5
  batch = {**batch, "intra": ids}
  for padding, want_grad in [(True, 0.0), (False, None)]:
    m, var, mod = _input_term("bipe_rope", batch, release_padding_row=padding)
    table = np.asarray(var["params"]["table"])
    out = np.asarray(mod.apply(var, batch))
    grad = jax.grad(lambda v: jnp.sum(mod.apply(v, batch) ** 3))(var)["params"]["table"]
    if padding:
      assert not table[-1].any() and not out[0, 3:5].any()
      assert not np.asarray(grad[-1]).any(), "the padding row must get no gradient"
      np.testing.assert_array_equal(out[0, :3], table[[0, 1, 5]] * [[1], [1], [0]])
    else:
      assert np.asarray(grad[-1]).any() and table[-1].any()


def test_registry_derives_bilevel_twins_and_validates():
  relative = [e for e in encodings.KINDS.values() if e.relative and not e.bilevel]
  assert {e.name for e in relative} == {"rope", "xpos", "randomized_rope", "alibi", "fire"}
  for e in relative:
    twin = encodings.get("bipe_" + e.name)
    assert twin.bilevel and isinstance(twin.input_term, Intra)
    assert twin.relative is e.relative and twin.params_cls is e.params_cls
  assert _cfg("alibi").pe_params.alibi_multiplier == 1.0
  assert _cfg("bipe_alibi").pe_params.alibi_multiplier == 96.0
  assert _cfg("bipe_alibi", alibi_multiplier=8.0).pe_params.alibi_multiplier == 8.0
  assert isinstance(_cfg("bipe_fire").pe_params, FireParams)
  with pytest.raises(ValueError, match="valid kinds: .*bipe_fire"):
    encodings.get("kerple")
  with pytest.raises(ValueError, match="pe.fire_hidden"):
    _cfg("fire", fire_hidden=0)
  with pytest.raises(ValueError, match="pe.intra"):
    _cfg("bipe_rope", intra="table")
  with pytest.raises(ValueError, match="pe.xpos_scale_base"):
    _cfg("bipe_xpos", xpos_scale_base=-1.0)
  with pytest.raises(ValueError, match="release_padding_row"):
    _cfg("bipe_alibi", intra="sinusoidal", release_padding_row=True)
