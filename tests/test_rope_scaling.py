"""Context extension of the rotary kinds (pe.rope_scaling) against the papers' formulas.

The frequency schedules are written here in numpy float64 straight from the
papers (Chen et al. 2023: positions / s; NTK-aware: base * s^(D/(D-2)); Peng
et al. 2023, YaRN eq. 17-20: ramp in r = L / lambda between alpha and beta and
the temperature sqrt(1/t) = 0.1 ln s + 1), with loops, not our vectorised code.
"""
import math

import jax
import numpy as np
import pytest

from bipe_jax import config as config_lib
from bipe_jax import positions
from bipe_jax.configs import base
from bipe_jax.encodings import rope, rope_scaling as S
from bipe_jax.model import Decoder, ModelConfig

D = 16


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


def _np_theta(head_dim, base):
  return np.array([base ** (-2 * i / head_dim) for i in range(head_dim // 2)])


def _np_yarn(head_dim, base, s, length, alpha, beta):
  out = []
  for theta in _np_theta(head_dim, base):
    r = length / (2 * math.pi / theta)            # rotations over the original length
    gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
    out.append((1 - gamma) * theta / s + gamma * theta)
  return np.array(out)


@pytest.mark.parametrize("s", [2.0, 4.0, 16.0])
def test_schedules_equal_the_papers_formulas(s):
  base_ = 10000.0
  theta = _np_theta(D, base_)
  pi = S.inv_frequencies(D, base_, S.RopeScaling("linear", s))
  np.testing.assert_allclose(pi, theta / s, rtol=1e-6)
  ntk = S.inv_frequencies(D, base_, S.RopeScaling("ntk", s))
  np.testing.assert_allclose(ntk, _np_theta(D, base_ * s ** (D / (D - 2))), rtol=1e-5)
  # NTK keeps the highest frequency and divides the lowest by exactly s.
  assert ntk[0] == pytest.approx(1.0) and ntk[-1] == pytest.approx(theta[-1] / s, rel=1e-5)
  for length, alpha, beta in ((128, 1.0, 32.0), (4096, 1.0, 32.0), (64, 2.0, 8.0)):
    yarn = S.inv_frequencies(D, base_, S.RopeScaling("yarn", s, length, beta, alpha))
    np.testing.assert_allclose(yarn, _np_yarn(D, base_, s, length, alpha, beta), rtol=1e-5)
  # With the default L = data.seq_len.
  np.testing.assert_allclose(S.inv_frequencies(D, base_, S.RopeScaling("yarn", s), 256),
                             _np_yarn(D, base_, s, 256, 1.0, 32.0), rtol=1e-5)


def test_yarn_ramp_covers_all_three_regimes():
  """At L = 4096, base 1e4, D = 16 some frequencies are kept, some interpolated, one mixed."""
  theta = _np_theta(D, 1e4)
  r = 4096 * theta / (2 * math.pi)
  assert (r > 32).any() and (r < 1).any() and ((r > 1) & (r < 32)).any()
  yarn = np.asarray(S.inv_frequencies(D, 1e4, S.RopeScaling("yarn", 8.0, 4096)))
  np.testing.assert_allclose(yarn[r > 32], theta[r > 32], rtol=1e-6)
  np.testing.assert_allclose(yarn[r < 1], theta[r < 1] / 8, rtol=1e-6)
  mixed = (r > 1) & (r < 32)
  assert (yarn[mixed] < theta[mixed]).all() and (yarn[mixed] > theta[mixed] / 8).all()


@pytest.mark.parametrize("s", [1.0, 2.0, 8.0, 32.0])
def test_yarn_temperature_scales_the_logits_by_1_over_t(s):
  """q.k after rotation: YaRN's equals the rotated dot product with its frequencies,
  times (0.1 ln s + 1)^2 = 1/t (numpy rotation in the rotate-half layout)."""
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 1, 6, 1, D))
  pos = np.array([[0, 3, 17, 40, 100, 511]])
  scaling = S.RopeScaling("yarn", s, 64)
  theta = _np_yarn(D, 1e4, s, 64, 1.0, 32.0)

  def np_rotate(x):
    ang = pos[..., None] * theta
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    half = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos[:, :, None] + half * sin[:, :, None]

  want = np.einsum("bthd,bshd->bts", np_rotate(q), np_rotate(k)) * (0.1 * math.log(s) + 1) ** 2
  q2, k2 = (rope.apply_rope(x.astype(np.float32), pos, 1e4, scaling) for x in (q, k))
  got = np.einsum("bthd,bshd->bts", q2, k2)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert scaling.attention_factor == pytest.approx(0.1 * math.log(s) + 1)


def _cfg(kind, scaling=S.RopeScaling(), **kw):
  base_ = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32,
               pe_kind=kind, max_intra=16, max_positions=32, xpos_scale_base=64.0,
               attention_impl="reference", rope_scaling=scaling, init_std=0.2)
  return ModelConfig(**{**base_, **kw})


def _batch(length=48, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 40, (2, length)).astype(np.int32)
  tokens[rng.random((2, length)) < 0.2] = 1
  table = np.zeros(40, bool)
  table[1] = True
  intra, inter = positions.bilevel_ids(tokens, table, max_intra=16)
  z = np.zeros_like(tokens)
  return dict(tokens=tokens, intra=intra, inter=inter, doc_ids=z,
              positions=np.tile(np.arange(length, dtype=np.int32), (2, 1)))


def _logits(m, params, batch):
  return np.asarray(Decoder(m).apply({"params": params}, batch))


@pytest.mark.parametrize("kind", ["rope", "bipe_rope", "xpos", "bipe_randomized_rope"])
def test_scale_1_and_none_equal_plain_rotary_exactly(kind):
  batch = _batch()
  plain = _cfg(kind)
  params = Decoder(plain).init(jax.random.key(0), batch)["params"]
  want = _logits(plain, params, batch)
  for name in S.KINDS:
    got = _logits(_cfg(kind, S.RopeScaling(name, 1.0)), params, batch)
    np.testing.assert_array_equal(got, want, err_msg=f"rope_scaling.kind={name}, factor 1")
  stretched = _logits(_cfg(kind, S.RopeScaling("yarn", 4.0)), params, batch)
  assert np.abs(stretched - want).max() > 1e-3  # the comparison can fail


@pytest.mark.parametrize("kind", ["rope", "bipe_rope"])
def test_linear_at_s_times_the_positions_equals_plain_at_the_positions(kind):
  """PI: the model with factor s sees rotated position s*p as the plain model sees p."""
  s = 4
  batch = _batch()
  plain, pi = _cfg(kind), _cfg(kind, S.RopeScaling("linear", float(s)))
  params = Decoder(plain).init(jax.random.key(1), batch)["params"]
  stretched = dict(batch, inter=batch["inter"] * s, positions=batch["positions"] * s)
  np.testing.assert_allclose(_logits(pi, params, stretched), _logits(plain, params, batch),
                             rtol=1e-4, atol=1e-4)
  # ... and unscaled at s*p differs: the rotation really moved.
  assert np.abs(_logits(plain, params, stretched) - _logits(plain, params, batch)).max() > 1e-3


def test_rope_scaling_keys_in_the_config_are_validated():
  c = base.get_config()
  c.pe.kind = "rope"
  c.pe.rope_scaling.kind, c.pe.rope_scaling.factor = "yarn", 4.0
  config_lib.validate(c)
  m = ModelConfig.from_config(c, 10)
  assert m.pe_params.rope_scaling == S.RopeScaling("yarn", 4.0)
  bad = [("kind", "yarm", "pe.rope_scaling.kind='yarm'; valid: none, linear, ntk, yarn"),
         ("factor", 0.5, "pe.rope_scaling.factor=0.5"),
         ("original_length", -1, "pe.rope_scaling.original_length=-1"),
         ("beta_slow", 40.0, "beta_slow=40.0 and beta_fast=32.0")]
  for key, value, message in bad:
    c2 = base.get_config()
    c2.pe.rope_scaling.kind = "ntk"
    c2.pe.rope_scaling[key] = value
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
      config_lib.validate(c2)
  for kind in ("alibi", "bipe_alibi", "fire", "learned", "none"):
    c3 = base.get_config()
    c3.pe.kind, c3.pe.rope_scaling.kind = kind, "linear"
    with pytest.raises(config_lib.ConfigError, match=f"pe.kind='{kind}' rotates nothing"):
      config_lib.validate(c3)
