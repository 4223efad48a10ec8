"""Import of the authors' release: a tiny checkpoint in their layout, written with
numpy + safetensors, must give the logits of a numpy forward pass of the same
weights written from the release's formulas (float64, independent of our code).
"""
import json
import math
import os

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from bipe_jax import positions
from bipe_jax.interop import release
from bipe_jax.model import Decoder, ModelConfig
from bipe_jax import convert, evaluate

V, D, H, K, F, LAYERS, TRAIN_SCALE = 900, 32, 4, 2, 64, 2, 8


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  # Accelerators may default to TF32/bf16 passes; the formulas are compared at 1e-4.
  with jax.default_matmul_precision("float32"):
    yield
SEPS = (13, 869)


def _hf_config(rpe_type):
  return dict(architectures=["MyLlamaForCausalLM"], bos_token_id=1, eos_token_id=2,
              hidden_act="silu", hidden_size=D, initializer_range=0.02,
              intermediate_size=F, max_position_embeddings=TRAIN_SCALE,
              model_type="llama", num_attention_heads=H, num_hidden_layers=LAYERS,
              num_key_value_heads=K, pad_token_id=-1, pretraining_tp=1,
              rms_norm_eps=1e-5, rope_scaling=None, tie_word_embeddings=False,
              torch_dtype="float32", vocab_size=V, rpe_type=rpe_type,
              log_scale=False, train_scale=TRAIN_SCALE)


def _tensors(rpe_type, seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  dh = D // H
  t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D),
       "lm_head.weight": w(V, D)}
  if rpe_type.startswith("bipe"):
    table = w(TRAIN_SCALE, D)
    table[-1] = 0.0  # nn.Embedding(padding_idx=-1)
    t["model.embeds.0.weight"] = table
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    t.update({p + "self_attn.q_proj.weight": w(H * dh, D),
              p + "self_attn.k_proj.weight": w(K * dh, D),
              p + "self_attn.v_proj.weight": w(K * dh, D),
              p + "self_attn.o_proj.weight": w(D, H * dh),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F),
              p + "input_layernorm.weight": 1 + w(D),
              p + "post_attention_layernorm.weight": 1 + w(D)})
  return t


def _write_release(path, rpe_type, dtype=np.float32):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(_hf_config(rpe_type), f)
  tensors = _tensors(rpe_type)
  st_numpy.save_file({k: v.astype(dtype) for k, v in tensors.items()},
                     os.path.join(path, "model.safetensors"))
  return tensors


# ---- numpy forward pass, written from the release's modeling code -------------

def _release_bilevel_ids(ids):
  """(intra, inter) the release's way: one loop, separators 13 / 869, clip intra."""
  intra, inter = np.zeros_like(ids), np.zeros_like(ids)
  for b in range(ids.shape[0]):
    seg, start = 0, 0
    for t in range(ids.shape[1]):
      inter[b, t], intra[b, t] = seg, min(t - start, TRAIN_SCALE - 1)
      if ids[b, t] in SEPS:
        seg, start = seg + 1, t + 1
  return intra, inter


def _slopes(n, mult):
  p = 2 ** math.floor(math.log2(n))
  pw = lambda m: [2 ** (-8 / m * (h + 1)) for h in range(m)]
  s = pw(p) + pw(2 * p)[0::2][: n - p]
  return np.array(s) * mult


def _numpy_logits(t, rpe_type, ids):
  b, length = ids.shape
  dh, g = D // H, H // K
  intra, inter = _release_bilevel_ids(ids)
  f64 = {k: v.astype(np.float64) for k, v in t.items()}
  x = f64["model.embed_tokens.weight"][ids]
  if rpe_type.startswith("bipe"):
    x = x + f64["model.embeds.0.weight"][intra]
  pos = inter if rpe_type.startswith("bipe") else np.tile(np.arange(length), (b, 1))
  rms = lambda v, wt: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5) * wt
  inv = 1.0 / 10000 ** (np.arange(0, dh, 2) / dh)
  ang = pos[..., None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  half = lambda v: np.concatenate([-v[..., dh // 2:], v[..., : dh // 2]], -1)
  causal = np.tril(np.ones((length, length), bool))
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    h = rms(x, f64[p + "input_layernorm.weight"])
    q = (h @ f64[p + "self_attn.q_proj.weight"].T).reshape(b, length, H, dh)
    k = (h @ f64[p + "self_attn.k_proj.weight"].T).reshape(b, length, K, dh)
    v = (h @ f64[p + "self_attn.v_proj.weight"].T).reshape(b, length, K, dh)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # repeat_kv
    if "rope" in rpe_type:
      q = q * cos[:, :, None] + half(q) * sin[:, :, None]
      k = k * cos[:, :, None] + half(k) * sin[:, :, None]
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
    if "alibi" in rpe_type:  # the release's per-key form: + m_h * pos[j]
      m = _slopes(H, 96.0 if rpe_type == "bipe_alibi" else 1.0)
      s = s + m[None, :, None, None] * pos[:, None, None, :]
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", a, v).reshape(b, length, H * dh)
    x = x + o @ f64[p + "self_attn.o_proj.weight"].T
    h = rms(x, f64[p + "post_attention_layernorm.weight"])
    gate, up = h @ f64[p + "mlp.gate_proj.weight"].T, h @ f64[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ f64[p + "mlp.down_proj.weight"].T
  return rms(x, f64["model.norm.weight"]) @ f64["lm_head.weight"].T


def _tokens(b=2, length=40, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V, size=(b, length))
  ids[rng.random((b, length)) < 0.12] = 13
  ids[0, 3], ids[1, 20] = 869, 869
  ids[:, 26:] = np.where(np.isin(ids[:, 26:], SEPS), 5, ids[:, 26:])  # a segment > TRAIN_SCALE
  return ids.astype(np.int32)


def _our_batch(ids):
  table = np.zeros(V, bool)
  table[list(SEPS)] = True
  intra, inter = positions.bilevel_ids(ids, table, max_intra=TRAIN_SCALE)
  z = np.zeros_like(ids)
  return dict(tokens=ids, intra=intra, inter=inter, doc_ids=z,
              positions=np.tile(np.arange(ids.shape[1], dtype=np.int32), (ids.shape[0], 1)))


@pytest.mark.parametrize("rpe_type", ["bipe_rope", "bipe_alibi", "rope", "alibi"])
def test_import_matches_numpy_forward(tmp_path, rpe_type):
  tensors = _write_release(str(tmp_path), rpe_type)
  imported = release.load(str(tmp_path))
  m = imported.model_cfg
  assert m.pe_kind == rpe_type and m.n_kv_heads == K and m.max_intra == TRAIN_SCALE
  ids = _tokens()
  ours = np.asarray(Decoder(m).apply({"params": imported.params}, _our_batch(ids)))
  ref = _numpy_logits(tensors, rpe_type, ids)
  err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert err < 1e-4, f"{rpe_type}: max |ours - numpy| / max |numpy| = {err:.2e}"
  c = imported.config
  assert tuple(c.segmentation.separator_ids) == SEPS and c.data.packing == "windows"
  assert c.pe.release_padding_row and c.data.seq_len == TRAIN_SCALE
  # The trainer / evaluator rebuild the model from the config alone.
  assert ModelConfig.from_config(c, V) == m


def test_half_precision_weights_import(tmp_path):
  tensors = _write_release(str(tmp_path), "bipe_alibi", dtype=np.float16)
  imported = release.load(str(tmp_path))
  np.testing.assert_array_equal(imported.params["layer_1"]["mlp"]["down"]["kernel"],
                                tensors["model.layers.1.mlp.down_proj.weight"]
                                .astype(np.float16).astype(np.float32).T)


def test_import_errors_name_the_problem(tmp_path):
  _write_release(str(tmp_path), "bipe_rope")
  hf = _hf_config("kerple")
  with pytest.raises(release.ReleaseError, match="rpe_type='kerple'"):
    release.model_config(hf)
  with pytest.raises(release.ReleaseError, match="log_scale"):
    release.model_config({**_hf_config("rope"), "log_scale": True})
  tensors = _tensors("bipe_rope")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(release.ReleaseError, match="mlp.up_proj"):
    release.params_from_tensors(tensors, release.model_config(_hf_config("bipe_rope")))
  with pytest.raises(release.ReleaseError, match="no model.safetensors"):
    release.read_tensors(str(tmp_path / "missing"))


def test_saved_alibi_buffer_is_checked():
  m = release.model_config(_hf_config("bipe_alibi"))
  tensors = _tensors("bipe_alibi")
  buf = _slopes(H, 96.0)[None, :, None, None] * np.arange(TRAIN_SCALE)
  tensors["model.layers.0.self_attn.alibi"] = buf.astype(np.float16)
  release.params_from_tensors(tensors, m)  # matching slopes: accepted, ignored
  tensors["model.layers.0.self_attn.alibi"] = (buf / 96).astype(np.float16)
  with pytest.raises(release.ReleaseError, match="slopes"):
    release.params_from_tensors(tensors, m)


def _llama_like_tokenizer(path, n_pieces=1000):
  """A SentencePiece model with the Llama id layout: 0 unk, 1 <s>, 2 </s>,
  3..258 byte pieces (so 13 = <0x0A>), and piece 869 = "▁."."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  m = pb.ModelProto()
  m.trainer_spec.model_type = pb.TrainerSpec.BPE
  m.trainer_spec.vocab_size = n_pieces
  m.trainer_spec.byte_fallback = True
  m.normalizer_spec.name = "identity"
  m.normalizer_spec.add_dummy_prefix = True
  m.normalizer_spec.remove_extra_whitespaces = False
  T = pb.ModelProto.SentencePiece.Type
  add = lambda piece, kind, score=0.0: m.pieces.add(piece=piece, type=kind, score=score)
  add("<unk>", T.UNKNOWN)
  add("<s>", T.CONTROL)
  add("</s>", T.CONTROL)
  for byte in range(256):
    add(f"<0x{byte:02X}>", T.BYTE)
  i = len(m.pieces)
  while len(m.pieces) < n_pieces:
    add("\u2581." if len(m.pieces) == 869 else f"\u2581w{i}", T.NORMAL, -float(i))
    i += 1
  with open(path, "wb") as f:
    f.write(m.SerializeToString())


def test_llama_tokenizer_with_release_separators(tmp_path):
  _llama_like_tokenizer(str(tmp_path / "tokenizer.model"))
  tok, table = release.load_tokenizer(str(tmp_path))
  assert np.flatnonzero(table).tolist() == [13, 869]
  assert 13 in tok.encode("w300\nw301").tolist()
  bad = tmp_path / "other"
  bad.mkdir()
  _llama_like_tokenizer(str(bad / "tokenizer.model"), n_pieces=500)
  with pytest.raises(release.ReleaseError, match="869"):
    release.load_tokenizer(str(bad))


def test_convert_writes_restorable_orbax_checkpoint(tmp_path):
  src, out = tmp_path / "release", tmp_path / "out"
  _write_release(str(src), "bipe_rope")
  _llama_like_tokenizer(str(src / "tokenizer.model"))
  step_dir = convert.convert(str(src), str(out))
  assert step_dir.endswith(os.path.join("checkpoints", "0"))
  imported = release.load(str(src))
  config = evaluate.load_config(str(out))
  trainer, state = evaluate.restore_params(config, str(out), imported.model_cfg.vocab_size)
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.params, imported.params)
  with open(out / "config.json") as f:
    cfg = json.load(f)
  assert cfg["pe"]["kind"] == "bipe_rope" and cfg["tokenizer"]["model"].endswith("tokenizer.model")
  with pytest.raises(FileExistsError):
    convert.convert(str(src), str(out))


def test_eval_hf_checkpoint_directly_equals_converted(tmp_path):
  src = tmp_path / "release"
  _write_release(str(src), "bipe_alibi")
  _llama_like_tokenizer(str(src / "tokenizer.model"), n_pieces=V)
  corpus = tmp_path / "corpus.jsonl"
  with open(corpus, "w") as f:
    for i in range(40):
      f.write(json.dumps({"text": " ".join(f"w{300 + (i * 7 + j) % 200}" for j in range(60))
                          + "\n" * (i % 3)}) + "\n")
  direct = evaluate.evaluate(str(tmp_path / "direct"), lengths=(16, 32),
                             hf_checkpoint=str(src), source=str(corpus))
  convert.convert(str(src), str(tmp_path / "conv"))
  converted = evaluate.evaluate(str(tmp_path / "conv"), lengths=(16, 32), source=str(corpus))
  assert [r["nll"] for r in direct["results"]] == pytest.approx(
      [r["nll"] for r in converted["results"]], rel=1e-6)
  assert all(np.isfinite(r["ppl"]) for r in direct["results"])


@pytest.mark.parametrize("rpe_type", ["bipe_rope", "bipe_alibi"])
def test_generate_from_a_release_matches_its_numpy_greedy_decoding(tmp_path, capsys, rpe_type):
  """bipe-generate --hf_checkpoint: cached decoding of the imported model picks, at
  every step, the argmax of the release's own forward pass over the whole prefix."""
  from bipe_jax import decode, generate  # pylint: disable=g-import-not-at-top
  src = tmp_path / "release"
  tensors = _write_release(str(src), rpe_type)
  _llama_like_tokenizer(str(src / "tokenizer.model"), n_pieces=V)
  prompt = "w300 w301\nw302 . w303 w304"
  out = generate.generate(None, prompt, 14, decode.Sampling(), stop_at_bos=False, chunk=5,
                          hf_checkpoint=str(src))
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == "w300 w301" and "decode: 14 tokens" in printed[-1], printed
  tok, _ = release.load_tokenizer(str(src))
  seq = [tok.bos_id] + [int(t) for t in tok.encode(prompt)]
  assert 13 in seq and 869 in seq
  for got in out.tokens[0]:
    want = int(np.argmax(_numpy_logits(tensors, rpe_type, np.array([seq]))[0, -1]))
    assert got == want, (seq, got, want)
    seq.append(want)
  assert len(seq) > 2 * TRAIN_SCALE
