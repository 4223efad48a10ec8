"""Attention kernels against the dense reference (and the reference against numpy).

Every case has several documents in a row, ragged lengths (not multiples of
the blocks), grouped kv heads and, where marked, a query offset (queries are
the last T of S keys, as in cached decoding). Values and the gradients of
q, k, v are compared; for the learned FIRE bias also its parameters'.
The Pallas kernels run interpreted on CPU and are lowered for their real
backend (Mosaic TPU, Triton CUDA) without running. The sharded path runs on
8 fake CPU devices in a subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipe_jax import encodings
from bipe_jax.attention import Bias, chunked, cudnn, dense, dispatch, pallas_gpu, pallas_tpu, reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_case(b=2, t=45, s=None, h=4, kv=2, d=16, bias="alibi", dtype=jnp.float32, seed=0,
              pos_scale=1.0, docs=True):
  """q, k, v and keyword args: row 0 holds 3 documents (unless not `docs`), row 1 one.

  Positions (segment ids) restart at every document.
  """
  s = s or t
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = (jnp.asarray(x, dtype) for x in (normal(b, t, h, d), normal(b, s, kv, d),
                                              normal(b, s, kv, d)))
  bounds = np.array([0, s // 4, (2 * s) // 3])
  doc = np.zeros((b, s), np.int32)
  if docs:
    doc[0] = np.searchsorted(bounds, np.arange(s), side="right") - 1
  sep = rng.random((b, s)) < 0.3
  pos = np.zeros((b, s), np.float32)
  for j in range(1, s):
    pos[:, j] = np.where(doc[:, j] != doc[:, j - 1], 0, pos[:, j - 1] + sep[:, j - 1])
  pos = jnp.asarray(pos * pos_scale)
  q_pos, q_doc = pos[:, s - t:], jnp.asarray(doc[:, s - t:])
  if bias == "alibi":
    slopes = jnp.asarray(encodings.alibi_slopes(h, 96.0), jnp.float32)
    bi = Bias(slopes, q_pos, pos)
  elif bias == "fire":
    w = 8
    bi = encodings.FireBias(jnp.float32(0.1), jnp.float32(6.0), jnp.asarray(normal(w)),
                            jnp.asarray(normal(w)), jnp.asarray(normal(w, h) / 3),
                            jnp.asarray(normal(h)), q_pos, pos)
  else:
    bi = None
  return (q, k, v), dict(q_doc_BT=q_doc, k_doc_BS=jnp.asarray(doc), bias=bi, q_offset=s - t)


_reference = jax.jit(reference.attention, static_argnames=("q_offset",))


def _loss(fn, kw):
  def loss(q, k, v, bias):
    out = fn(q, k, v, **{**kw, "bias": bias}).astype(jnp.float32)
    weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * weights)
  return loss


def assert_matches_reference(fn, args, kw, atol=2e-5, grad_atol=1e-4, bias_grads=False):
  """Values and q/k/v gradients (and bias-leaf gradients) of `fn` equal the reference's."""
  want = _reference(*args, **kw)
  got = fn(*args, **kw)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=atol, rtol=atol, err_msg="forward values differ")
  argnums = (0, 1, 2, 3) if bias_grads else (0, 1, 2)
  g_want = jax.jit(jax.grad(_loss(reference.attention, kw), argnums))(*args, kw["bias"])
  g_got = jax.jit(jax.grad(_loss(fn, kw), argnums))(*args, kw["bias"])
  if bias_grads:   # positions are data: kernels give them no gradient, the reference does
    drop = lambda g: g[:3] + (g[3].replace(q_pos_BT=None, k_pos_BS=None),)
    g_want, g_got = drop(g_want), drop(g_got)
  for name, a, b in zip(("dq", "dk", "dv", "dbias"), g_got, g_want):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      scale = max(1.0, float(jnp.max(jnp.abs(y))))
      np.testing.assert_allclose(np.asarray(x, np.float32) / scale, np.asarray(y, np.float32) / scale,
                                 atol=grad_atol, err_msg=f"{name} differs")


# --- reference against numpy (the oracle's oracle) ---------------------------------------------

def test_reference_matches_float64_numpy_with_large_bipe_alibi_positions():
  """Segment ids in the thousands with slopes x96: float32 positions must not round."""
  (q, k, v), kw = make_case(t=40, s=64, pos_scale=150.0, bias="alibi")
  out = np.asarray(_reference(q, k, v, **kw), np.float64)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = qn.shape
  s, g = kn.shape[1], h // kn.shape[2]
  kn, vn = np.repeat(kn, g, axis=2), np.repeat(vn, g, axis=2)
  bias = kw["bias"]
  qp, kp = np.asarray(bias.q_pos_BT, np.float64), np.asarray(bias.k_pos_BS, np.float64)
  slopes = np.asarray(bias.slopes_H, np.float64)
  scores = np.einsum("bthd,bshd->bhts", qn, kn) / np.sqrt(d)
  scores -= slopes[None, :, None, None] * (qp[:, None, :, None] - kp[:, None, None, :])
  causal = np.arange(t)[:, None] + kw["q_offset"] >= np.arange(s)[None, :]
  same_doc = np.asarray(kw["q_doc_BT"])[:, :, None] == np.asarray(kw["k_doc_BS"])[:, None, :]
  scores = np.where((causal[None] & same_doc)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  want = np.einsum("bhts,bshd->bthd", probs / probs.sum(-1, keepdims=True), vn)
  np.testing.assert_allclose(out, want, atol=2e-5, err_msg="reference != float64 numpy")
  assert float(kp.max()) > 1000, "positions were meant to be large"


# --- chunked ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias,b,t,s,h,kv,docs", [
    ("none", 2, 45, 45, 4, 2, False), ("alibi", 2, 45, 45, 4, 2, True),
    ("fire", 2, 45, 45, 4, 2, True), ("alibi", 1, 45, 45, 4, 4, True),
    ("fire", 2, 19, 45, 2, 1, True)])
def test_chunked_matches_reference(bias, b, t, s, h, kv, docs):
  """Tiles of all three kinds occur: unmasked (one document), masked, skipped (b=1)."""
  args, kw = make_case(b=b, t=t, s=s, h=h, kv=kv, bias=bias, docs=docs)
  fn = jax.jit(lambda *a, **k: chunked.attention(*a, **k, block_q=16, block_k=8),
               static_argnames=("q_offset",))
  assert_matches_reference(fn, args, kw, bias_grads=bias == "fire")


def test_chunked_bf16_and_traced_offset():
  args, kw = make_case(t=24, s=40, dtype=jnp.bfloat16)
  off = kw.pop("q_offset")
  fn = jax.jit(lambda q, k, v, off, **k_: chunked.attention(q, k, v, q_offset=off, block_q=8,
                                                            block_k=16, **k_))
  got = fn(*args, jnp.int32(off), **kw)
  want = reference.attention(*args, q_offset=off, **kw)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_chunked_memory_is_linear_in_length():
  """Compiled fwd+bwd temporaries at 2L are about twice those at L, far below [H, L, L]."""
  def temp_bytes(length):
    q = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    doc = jax.ShapeDtypeStruct((1, length), jnp.int32)
    def loss(q, k, v, doc):
      return chunked.attention(q, k, v, q_doc_BT=doc, k_doc_BS=doc, block_q=256, block_k=256).sum()
    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    return grad.lower(q, q, q, doc).compile().memory_analysis().temp_size_in_bytes
  small, large = temp_bytes(2048), temp_bytes(4096)
  assert large < 2.6 * small, (small, large)
  assert large < 4 * 4096 * 4096 * 4 / 8, f"{large} bytes is a sizeable part of one [H, L, L] f32"


# --- dense (saved probabilities) ---------------------------------------------------------------

@pytest.mark.parametrize("bias,b,t,s,h,kv,docs", [
    ("none", 2, 45, 45, 4, 2, False), ("alibi", 2, 45, 45, 4, 2, True),
    ("fire", 2, 45, 45, 4, 2, True), ("fire", 2, 19, 45, 2, 1, True)])
def test_dense_matches_reference(bias, b, t, s, h, kv, docs):
  """Row blocks of 16 (the last one ragged), each scoring only its visible keys."""
  args, kw = make_case(b=b, t=t, s=s, h=h, kv=kv, bias=bias, docs=docs)
  assert len(dense.row_blocks(t, s, kw["q_offset"], 16)) == -(-t // 16)
  fn = jax.jit(lambda *a, **k: dense.attention(*a, **k, row_block=16),
               static_argnames=("q_offset",))
  assert_matches_reference(fn, args, kw, bias_grads=bias == "fire")


def test_dense_row_blocks_score_only_visible_keys():
  assert dense.row_blocks(40, 40, 0, 16) == ((0, 16, 16), (16, 32, 32), (32, 40, 40))
  assert dense.row_blocks(8, 40, 32, 16) == ((0, 8, 40),)
  assert dense.row_blocks(8, 40, jnp.int32(32), 16) == ((0, 8, 40),)


def test_dense_bf16_and_traced_offset():
  args, kw = make_case(t=24, s=40, dtype=jnp.bfloat16)
  off = kw.pop("q_offset")
  fn = jax.jit(lambda q, k, v, off, **k_: dense.attention(q, k, v, q_offset=off, row_block=8, **k_))
  got = fn(*args, jnp.int32(off), **kw)
  want = reference.attention(*args, q_offset=off, **kw)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


# --- Pallas, interpreted on CPU, and lowered for the real backend ------------------------------

PALLAS = {
    "pallas_tpu": (pallas_tpu.attention, dict(block_q=32, block_k=128)),
    "pallas_gpu": (pallas_gpu.attention, dict(block_q=32, block_k=16)),
}


@pytest.mark.parametrize("kernel", sorted(PALLAS))
@pytest.mark.parametrize("bias,t,s", [("alibi", 150, 150), ("none", 37, 150)])
def test_pallas_interpret_matches_reference(kernel, bias, t, s):
  fn, blocks = PALLAS[kernel]
  args, kw = make_case(t=t, s=s, bias=bias, pos_scale=40.0)
  assert_matches_reference(lambda *a, **k: fn(*a, **k, **blocks, interpret=True), args, kw)


def test_pallas_rejects_other_bias_and_learned_slopes():
  args, kw = make_case(t=16, bias="fire")
  with pytest.raises(ValueError, match="chunked"):
    pallas_tpu.attention(*args, **kw, interpret=True)
  args, kw = make_case(t=16, bias="alibi")
  bias = kw.pop("bias")
  def loss(slopes):
    b = Bias(slopes, bias.q_pos_BT, bias.k_pos_BS)
    return pallas_gpu.attention(*args, **kw, bias=b, interpret=True).sum()
  with pytest.raises(NotImplementedError, match="slopes"):
    jax.grad(loss)(bias.slopes_H)


@pytest.mark.parametrize("kernel,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_pallas_lowers_for_its_backend(kernel, platform):
  """Forward and backward lower to Mosaic / Triton at model-like shapes (bf16, D 64, GQA)."""
  fn, _ = PALLAS[kernel]
  args, kw = make_case(b=1, t=1000, h=12, kv=4, d=64, dtype=jnp.bfloat16)
  kw["q_offset"] = 0
  loss = lambda q, k, v: fn(q, k, v, **kw).astype(jnp.float32).sum()
  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  assert "bipe_flash_dkv" in text and "bipe_flash_dq" in text


# --- on the hardware itself (skipped elsewhere; CI has neither) ---------------------------------

_ON = {"gpu": ("pallas_gpu", "cudnn"), "tpu": ("pallas_tpu",)}


@pytest.mark.skipif(jax.default_backend() not in _ON, reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bias,t,s", [("alibi", 300, 300), ("none", 300, 300), ("alibi", 77, 300)])
def test_kernels_run_on_their_hardware(dtype, bias, t, s):
  """Compiled (not interpreted) Pallas kernels, and cuDNN where it applies, vs reference."""
  args, kw = make_case(b=2, t=t, s=s, h=12, kv=4, d=64, bias=bias, dtype=dtype, pos_scale=40.0)
  tol = dict(atol=2e-2, grad_atol=3e-2) if dtype == jnp.bfloat16 else dict(atol=2e-3, grad_atol=5e-3)
  for name in _ON[jax.default_backend()]:
    if name == "cudnn":
      if bias != "none" or dtype != jnp.bfloat16 or t != s:
        continue
      kw1 = {**kw, "k_doc_BS": jnp.zeros_like(kw["k_doc_BS"]), "q_doc_BT": jnp.zeros_like(kw["q_doc_BT"])}
      assert_matches_reference(cudnn.attention, args, kw1, **tol)
    else:
      fn, _ = PALLAS[name]
      assert_matches_reference(fn, args, kw, **tol)


# --- dispatch -----------------------------------------------------------------------------------

def test_dispatch_routes_by_backend_bias_and_dtype():
  fire = make_case(t=8, bias="fire")[1]["bias"]
  alibi = make_case(t=8, bias="alibi")[1]["bias"]
  r = dispatch.resolve
  assert r("auto", None, "cpu") == "chunked"
  assert r("auto", alibi, "cpu") == "chunked"
  # dense while its probabilities are small: keys and B x H x T x S bounded
  assert r("auto", alibi, "cpu", scores=(1, 12, 1024, 1024)) == "dense"
  assert r("auto", fire, "cpu", scores=(4, 12, 2048, 2048)) == "chunked"
  assert r("auto", None, "cpu", scores=(1, 1, 16, 4096)) == "chunked"
  assert r("auto", None, "tpu", scores=(1, 12, 1024, 1024)) == "pallas"
  assert r("dense", fire, "gpu") == "dense"
  assert r("reference", alibi, "cpu") == "reference"
  assert r("auto", None, "gpu", jnp.bfloat16) == "cudnn"
  assert r("auto", None, "gpu", jnp.bfloat16, self_attention=False) == "pallas"
  with pytest.raises(ValueError, match="other keys"):
    r("cudnn", None, "gpu", jnp.bfloat16, self_attention=False)
  assert r("auto", None, "gpu", jnp.float32) == "pallas"
  assert r("auto", alibi, "gpu", jnp.bfloat16) == "pallas"
  assert r("auto", alibi, "tpu") == "pallas"
  assert r("auto", fire, "tpu") == "chunked"
  assert r("chunked", fire, "cpu") == "chunked"
  assert dispatch.kernel_fn("pallas", "gpu") is pallas_gpu.attention
  assert dispatch.kernel_fn("pallas", "tpu") is pallas_tpu.attention
  assert dispatch.kernel_fn("cudnn", "gpu") is cudnn.attention


@pytest.mark.parametrize("impl,pe_kind,backend,words", [
    ("cudnn", "bipe_alibi", "gpu", ["'cudnn'", "'bipe_alibi'", "pallas"]),
    ("pallas", "bipe_fire", "tpu", ["'pallas'", "'bipe_fire'", "chunked"]),
    ("pallas", None, "cpu", ["'pallas'", "'cpu'", "reference, chunked"]),
    ("cudnn", "bipe_rope", "tpu", ["'cudnn'", "'tpu'"]),
    ("flash", None, None, ["'flash'", "auto, reference"]),
])
def test_invalid_combinations_fail_at_config_time(impl, pe_kind, backend, words):
  with pytest.raises(ValueError) as e:
    if pe_kind:
      encodings.get(pe_kind).check_attention(impl, backend)
    else:
      dispatch.check(impl, backend=backend)
  for w in words:
    assert w in str(e.value), str(e.value)
  encodings.get(pe_kind or "rope").check_attention("auto", backend)


def test_call_time_errors_name_the_bias():
  args, kw = make_case(t=8, s=12, bias="fire")
  with pytest.raises(ValueError, match="other"):
    dispatch.resolve("cudnn", kw["bias"], "gpu", jnp.bfloat16)
  with pytest.raises(ValueError, match="self-attention"):
    cudnn.attention(*(x.astype(jnp.bfloat16) for x in args), **{**kw, "bias": None})


def test_single_document_rows():
  doc = jnp.zeros((2, 6), jnp.int32)
  assert bool(cudnn.single_document_rows(doc, doc))
  assert not bool(cudnn.single_document_rows(doc.at[1, 3:].set(1), doc.at[1, 3:].set(1)))


@pytest.mark.parametrize("impl,blocks", [("auto", {}), ("reference", {}),
                                         ("chunked", dict(block_q=8, block_k=16))])
def test_get_keeps_the_model_call_working(impl, blocks):
  args, kw = make_case(t=20, bias="alibi")
  got = jax.jit(lambda *a: dispatch.get(impl, **blocks)(*a, **kw))(*args)
  np.testing.assert_allclose(got, reference.attention(*args, **kw), atol=2e-5)
  with pytest.raises(TypeError, match="block_q"):
    dispatch.get(impl, block_z=4)


# --- shard_map on 8 fake devices (subprocess: XLA flags must precede jax import) ---------------

_SHARDED = textwrap.dedent("""
  import json, jax, jax.numpy as jnp, numpy as np, sys
  sys.path.insert(0, {tests!r})
  from test_attention import make_case
  from bipe_jax.attention import dispatch, reference
  assert jax.device_count() == 8
  Auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(Auto,) * 3)
  errs = {{}}
  for impl, bias in [("chunked", "alibi"), ("chunked", "fire"), ("reference", "none")]:
    args, kw = make_case(b=4, t=24, s=40, h=4, kv=2, bias=bias)
    want = reference.attention(*args, **kw)
    loss = lambda fn: (lambda q, k, v: (fn(q, k, v, **kw) ** 2).sum())
    g_want = jax.grad(loss(reference.attention), (0, 1, 2))(*args)
    with jax.set_mesh(mesh):
      fn = dispatch.get(impl)
      got = jax.jit(lambda *a: fn(*a, **kw))(*args)
      g_got = jax.jit(jax.grad(loss(fn), (0, 1, 2)))(*args)
      text = jax.jit(lambda *a: fn(*a, **kw)).lower(*args).as_text()
    errs[impl + "/" + bias] = [float(jnp.abs(got - want).max())] + [
        float(jnp.abs(a - b).max()) for a, b in zip(g_got, g_want)] + ["shard_map" in text or
        "sdy.manual_computation" in text]
  # Explicit mesh argument and no mesh in context; batch 2 does not divide
  # data x fsdp = 4, so rows split over data only.
  args, kw = make_case(b=2, t=16, bias="alibi")
  explicit = jax.jit(lambda *a: dispatch.get("chunked", mesh=mesh)(*a, **kw))
  text = explicit.lower(*args).as_text()
  errs["explicit/b2"] = [float(jnp.abs(explicit(*args) - reference.attention(*args, **kw)).max()),
                         "shard_map" in text or "sdy.manual_computation" in text]
  print(json.dumps(errs))
""")


def test_sharded_on_eight_fake_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  code = _SHARDED.format(tests=os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errs = json.loads(proc.stdout.strip().splitlines()[-1])
  for case, (*e, manual) in errs.items():
    assert manual, f"{case}: no shard_map in the lowered program"
    assert max(e) < 1e-4, f"{case}: max abs errors (out, dq, dk, dv) {e}"
