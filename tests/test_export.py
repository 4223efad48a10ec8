"""Export to the release's HF Llama layout (bipe-convert --to_hf) inverts the importer.

The importer is checked against a numpy forward pass written from the release's
formulas (test_interop.py); here a model of ours goes out through the exporter
and back in through that importer, and must give the same logits and the same
perplexity through bipe-eval.
"""
import json
import os

import jax
import numpy as np
import pytest

from bipe_jax import checkpoint, evaluate, positions
from bipe_jax.configs import base
from bipe_jax.interop import export, release
from bipe_jax.model import Decoder
from bipe_jax.trainer import Trainer
from test_cli import _assert_one_named_error, _drive


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


def _config(kind, tokenizer, max_intra=8, padding_row=False):
  c = base.get_config()
  c.pe.kind, c.pe.max_intra, c.pe.release_padding_row = kind, max_intra, padding_row
  c.data.seq_len = 16
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.d_ff, c.model.init_std, c.model.norm_eps = 48, 0.2, 1e-6
  c.pe.rope_base = 500.0
  c.tokenizer.model = tokenizer.model_path
  c.train.batch_size = 1
  return c


def _workdir(path, config, vocab_size, seed=0):
  """A work dir holding `config` and a randomly initialised checkpoint at step 3."""
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json())
  trainer = Trainer(config, vocab_size)
  state = trainer.init(jax.random.key(seed)).replace(step=jax.numpy.int32(3))
  ckpt = checkpoint.Checkpointer(str(path))
  ckpt.save(3, state, {}, force=True)
  ckpt.close()
  return trainer, jax.device_get(state.params)


def _batch(tokenizer, max_intra, length=40, long_segment=False, seed=0):
  table = tokenizer.separator_table("code")
  seps, others = np.flatnonzero(table), np.flatnonzero(~table)
  rng = np.random.default_rng(seed)
  tokens = rng.choice(others, (2, length))
  for row in tokens:   # a separator every 1..max_intra - 1 tokens: intra < max_intra - 1
    at = np.cumsum(rng.integers(1, max_intra - 1, length))
    row[at[at < length]] = rng.choice(seps, (at < length).sum())
  if long_segment:
    tokens[1, 10:] = others[0]
  intra, inter = positions.bilevel_ids(tokens, table, max_intra=max_intra)
  z = np.zeros_like(tokens)
  return dict(tokens=tokens.astype(np.int32), intra=intra, inter=inter, doc_ids=z,
              positions=np.tile(np.arange(length, dtype=np.int32), (2, 1))), table


@pytest.mark.parametrize("kind,padding_row", [("bipe_rope", False), ("bipe_rope", True),
                                              ("rope", False)])
def test_export_then_import_gives_equal_logits(tmp_path, code_tokenizer, kind, padding_row):
  config = _config(kind, code_tokenizer, padding_row=padding_row)
  trainer, params = _workdir(tmp_path / "run", config, code_tokenizer.vocab_size)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
  imported = release.load(out)
  m = back = imported.model_cfg
  # A segment longer than max_intra: its deep tokens read the last row (or zero).
  batch, table = _batch(code_tokenizer, 8, long_segment=True)
  ours = np.asarray(Decoder(trainer.model_cfg).apply({"params": params}, batch))
  theirs = np.asarray(Decoder(m).apply({"params": imported.params}, batch))
  assert np.abs(ours).max() > 1.0     # logits far from uniform: the comparison can fail
  np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-6)
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "norm_eps",
              "rope_base", "pe_kind", "vocab_size"):
    assert getattr(back, key) == getattr(trainer.model_cfg, key), key
  if kind == "bipe_rope":
    assert back.max_intra == 8 and back.release_padding_row == padding_row
  c = imported.config
  assert tuple(c.segmentation.separator_ids) == tuple(np.flatnonzero(table))
  assert c.tokenizer.model == os.path.join(out, "tokenizer.model")
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert hf["rpe_type"] == kind and hf["bos_token_id"] == code_tokenizer.bos_id
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                     "special_tokens_map.json", "tokenizer.model",
                                     "tokenizer_config.json"]


def test_exported_model_evaluates_as_the_run_does(tmp_path, code_tokenizer, code_texts):
  """bipe-eval --hf_checkpoint=OUT scores held-out text as bipe-eval --workdir=DIR."""
  corpus = tmp_path / "corpus.jsonl"
  with open(corpus, "w") as f:
    for text in code_texts:
      lines = text.splitlines(keepends=True)
      for i in range(0, len(lines), 40):
        f.write(json.dumps({"text": "".join(lines[i:i + 40])}) + "\n")
  config = _config("bipe_rope", code_tokenizer, max_intra=8)   # lines longer than 8 tokens
  _workdir(tmp_path / "run", config, code_tokenizer.vocab_size)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
  kw = dict(lengths=(64,), source=str(corpus), overrides=[("eval.max_tokens", "4096")])
  direct = evaluate.evaluate(str(tmp_path / "run"), **kw)["results"][0]
  exported = evaluate.evaluate(str(tmp_path / "eval_hf"), hf_checkpoint=out, **kw)["results"][0]
  assert direct["tokens"] == exported["tokens"] > 1000
  assert exported["nll"] == pytest.approx(direct["nll"], rel=1e-6)


def test_bad_exports_exit_2_naming_the_problem(tmp_path, code_tokenizer):
  def workdir(name, kind="bipe_rope", **pe):
    path = tmp_path / name
    os.makedirs(path)
    c = _config(kind, code_tokenizer)
    for k, v in pe.items():
      setattr(c.pe, k, v)
    (path / "config.json").write_text(c.to_json())
    return f"--workdir={path}"
  alibi, fire = workdir("alibi", "alibi"), workdir("fire", "bipe_fire")
  sinus = workdir("sinus", intra="sinusoidal")
  scaled = workdir("scaled")
  c = json.loads((tmp_path / "scaled" / "config.json").read_text())
  c["pe"]["rope_scaling"].update(kind="yarn", factor=4.0)
  (tmp_path / "scaled" / "config.json").write_text(json.dumps(c))
  taken = tmp_path / "taken"
  os.makedirs(taken)
  (taken / "model.safetensors").write_bytes(b"")
  out = f"--to_hf={tmp_path}/out"
  cases = [([out, alibi], "pe.kind='alibi' cannot be exported"),
           ([out, fire], "pe.kind='bipe_fire' cannot be exported"),
           ([out, sinus], "pe.intra='sinusoidal'"),
           ([out, scaled], "pe.rope_scaling.kind='yarn'"),
           ([out], "--workdir"), (["--to_hf=", alibi], "--to_hf"),
           ([out, f"--workdir={tmp_path}/none"], f"{tmp_path}/none/config.json"),
           ([f"--to_hf={taken}", workdir("ok")], f"{taken}/model.safetensors already exists"),
           ([out, alibi, f"--hf_checkpoint={taken}"], "--to_hf"),
           ([out, alibi, "--config.pe.kind=rope"], "pe.kind")]
  _assert_one_named_error(_drive("bipe_jax.convert", cases, tmp_path), cases)
  assert not os.path.exists(tmp_path / "out")


def test_importer_checks_our_own_keys():
  hf = dict(rpe_type="bipe_rope", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
            intermediate_size=64, rms_norm_eps=1e-5, vocab_size=100, train_scale=8)
  assert release.model_config(hf).release_padding_row           # the release's quirk
  assert not release.model_config({**hf, "bipe_intra_padding_row": False}).release_padding_row
  assert release.separator_ids(hf) == (13, 869)
  assert release.separator_ids({**hf, "bipe_separator_ids": [5, 7]}) == (5, 7)
  with pytest.raises(release.ReleaseError, match="bipe_intra_padding_row='no'"):
    release.model_config({**hf, "bipe_intra_padding_row": "no"})
  for bad in ([], [1.5], "13", [-1]):
    with pytest.raises(release.ReleaseError, match="bipe_separator_ids"):
      release.separator_ids({**hf, "bipe_separator_ids": bad})
