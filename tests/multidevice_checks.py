"""Runs the multi-device checks in a process of its own with 8 fake CPU devices.

    python tests/multidevice_checks.py OUT.json WORKDIR CACHE_DIR

The rest of the suite keeps 1 device, so tests/test_sharding.py starts this
once and asserts on the JSON it writes: per-step losses of each mesh, per-device
shard shapes of chosen parameters and Adam moments, cross-mesh restores,
gradient accumulation, mixed precision, remat and config errors.
"""
import os
import sys

# Before jax is imported: 8 host devices, and a cheaper compile (tiny models on
# 2 cores spend far more time in LLVM than in running).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8",
                                    "--xla_backend_optimization_level=0"])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax
import numpy as np

from bipe_jax import checkpoint, evaluate, sharding
from bipe_jax import config as config_lib
from bipe_jax.data import pipeline
from bipe_jax.trainer import Trainer
from tiny import tiny_config

STEPS = 5
# Parameters whose per-device shard shapes the test checks, by path.
WATCH = {
    "embed": ("embed",),                             # [vocab 320, embed 64]
    "lm_head": ("lm_head",),                         # [embed, vocab]
    "q": ("layer_0", "attn", "q", "kernel"),         # [embed, heads 4, head_dim 16]
    "k": ("layer_0", "attn", "k", "kernel"),         # [embed, kv_heads 2, head_dim]
    "o": ("layer_0", "attn", "o", "kernel"),         # [heads, head_dim, embed]
    "gate": ("layer_0", "mlp", "gate", "kernel"),    # [embed, mlp 128]
    "down": ("layer_0", "mlp", "down", "kernel"),    # [mlp, embed]
    "norm": ("layer_0", "attn_norm", "scale"),       # [embed]
}


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def shard_shapes(params) -> dict:
  out = {}
  for name, path in WATCH.items():
    x = _get(params, path)
    shapes = {tuple(s.data.shape) for s in x.addressable_shards}
    assert len(shapes) == 1, (name, shapes)
    out[name] = list(shapes.pop())
  return out


def adam_mu(state):
  """The Adam first moment tree (chain: clip, adamw -> (scale_by_adam, ...))."""
  for leaf in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")):
    if hasattr(leaf, "mu"):
      return leaf.mu
  raise AssertionError("no Adam state found")


def one_device_mesh(config):
  return sharding.make_mesh(config, devices=jax.devices()[:1])


def run_steps(trainer, batches, key=1, state=None):
  if state is None:
    state = trainer.init(jax.random.key(trainer.config.seed))
  losses = []
  for b in batches:
    state, m = trainer.step(state, trainer.global_batch(b), jax.random.key(key))
    losses.append(float(m["loss"]))
  return state, losses


def heldout_batch(config, corpus):
  return next(pipeline.eval_batches(config, corpus, config.data.seq_len, 512, 512))


def eval_nll(trainer, params, batch):
  s, n = trainer.eval_step(params, batch)
  return float(s) / float(n)


def config_error(config) -> str:
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    return str(e)
  return ""


def main(out_path, workdir, cache_dir):
  out = {"devices": jax.device_count(), "seconds": {}}
  t0 = time.time()

  def lap(name):
    nonlocal t0
    out["seconds"][name] = round(time.time() - t0, 1)
    t0 = time.time()

  config = tiny_config(steps=STEPS)
  config.data.cache_dir = cache_dir
  corpus = pipeline.prepare(config, workdir)
  vocab = corpus.vocab_size
  it = pipeline.train_iterator(config, corpus)
  batches = [next(it) for _ in range(STEPS)]
  held = heldout_batch(config, corpus)

  lap("prepare")

  # One device: the reference every mesh must reproduce.
  base = Trainer(config, vocab, one_device_mesh(config))
  # Host copy of the initial state: later trainers on a new layout start from it
  # (device_put onto their shardings) instead of compiling their own initialiser.
  init = jax.tree.map(np.asarray, base.init(jax.random.key(config.seed)))
  _, out["losses_1"] = run_steps(base, batches, state=jax.device_put(init, base.state_sharding))

  lap("one_device")

  out["meshes"] = {}
  for shape in ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"):
    config.mesh.shape = shape
    config_lib.validate(config)
    trainer = Trainer(config, vocab)
    state, losses = run_steps(trainer, batches)
    out["meshes"][shape] = {
        "mesh": dict(trainer.mesh.shape), "losses": losses,
        "params": shard_shapes(state.params), "mu": shard_shapes(adam_mu(state)),
        "data_shard": trainer.data_shard(), "eval_nll": eval_nll(trainer, state.params, held)}
    if shape == "fsdp=8":
      fsdp_state, fsdp_config = state, config.copy_and_resolve_references()

  lap("meshes")

  # Checkpoint across meshes: save from fsdp=8, restore onto 1 device and data=2,tensor=4.
  ckpt_dir = os.path.join(workdir, "fsdp8")
  os.makedirs(ckpt_dir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  ckpt.save(STEPS, fsdp_state, {}, force=True)
  ckpt.close()
  saved = jax.tree.map(np.asarray, fsdp_state.params)
  out["restored"] = {}
  for shape in ("one_device", "data=2,tensor=4"):
    c = fsdp_config.copy_and_resolve_references()
    c.mesh.shape = "data=-1" if shape == "one_device" else shape
    mesh = one_device_mesh(c) if shape == "one_device" else None
    trainer, state = evaluate.restore_params(c, ckpt_dir, vocab, mesh=mesh)
    out["restored"][shape] = {
        "mesh": dict(trainer.mesh.shape), "step": int(state.step),
        "params": shard_shapes(state.params),
        "params_equal": all(np.array_equal(a, np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(saved), jax.tree.leaves(state.params))),
        "eval_nll": eval_nll(trainer, state.params, held)}

  lap("restore")

  # Gradient accumulation: 4 micro-batches of 8 rows against one batch of 32.
  big = tiny_config(steps=3)
  big.data.cache_dir = cache_dir
  big.train.batch_size = 32
  big.mesh.shape = "data=4,fsdp=2"
  it = pipeline.train_iterator(big, corpus)
  big_batches = [next(it) for _ in range(3)]
  accum, init = {}, None
  for k in (1, 4):
    big.train.grad_accum_steps = k
    config_lib.validate(big)
    trainer = Trainer(big, vocab)
    if init is None:
      init = jax.tree.map(np.asarray, trainer.init(jax.random.key(big.seed)))
    # One initialiser compile serves both: the same mesh, so the same layout.
    start = jax.device_put(init, trainer.state_sharding)
    state, losses = run_steps(trainer, big_batches, state=start)
    accum[k] = (losses, jax.tree.map(np.asarray, state.params))
  out["accum"] = {
      "losses_1": accum[1][0], "losses_4": accum[4][0],
      "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in
                            zip(jax.tree.leaves(accum[1][1]), jax.tree.leaves(accum[4][1])))}

  lap("accum")

  # Mixed precision: bf16 compute, fp32 parameters and optimizer state.
  mp = tiny_config(steps=2)
  mp.data.cache_dir = cache_dir
  mp.mesh.shape = "fsdp=8"
  mp.model.dtype = "bfloat16"
  trainer = Trainer(mp, vocab)
  state = jax.device_put(init, trainer.state_sharding)
  hlo = trainer._step_jit.lower(state, trainer.global_batch(batches[0]),  # pylint: disable=protected-access
                                jax.random.key(1)).as_text()
  state, losses = run_steps(trainer, batches[:2], state=state)
  out["bf16"] = {"losses": losses, "bf16_dots": hlo.count("bf16"),
                 "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
                 "mu_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(adam_mu(state))})}

  lap("bf16")

  # Remat: the same numbers, with the blocks' forward recomputed in the backward pass.
  rm = tiny_config(steps=2)
  rm.data.cache_dir = cache_dir
  rm.mesh.shape = "data=2,fsdp=2,tensor=2"
  out["remat"] = {}
  for policy in ("full", "dots_no_batch"):
    rm.train.remat = policy
    trainer = Trainer(rm, vocab)
    state = jax.eval_shape(trainer._init, jax.random.key(0))  # pylint: disable=protected-access
    jaxpr = str(jax.make_jaxpr(trainer._step)(  # pylint: disable=protected-access
        state, batches[0], jax.random.key(1)))
    entry = {"remat_in_jaxpr": "checkpoint" in jaxpr or "remat" in jaxpr}
    if policy == "full":
      entry["losses"] = run_steps(trainer, batches[:2],
                                  state=jax.device_put(init, trainer.state_sharding))[1]
    out["remat"][policy] = entry

  lap("remat")

  # Config errors, before any work, naming both numbers.
  bad = tiny_config()
  bad.mesh.shape = "data=3"
  out["error_mesh"] = config_error(bad)
  bad = tiny_config()
  bad.mesh.shape = "data=2,fsdp=2,tensor=1"
  out["error_mesh_fixed"] = config_error(bad)
  bad = tiny_config()
  bad.train.batch_size = 12
  bad.mesh.shape = "data=8"
  out["error_batch"] = config_error(bad)
  bad = tiny_config()
  bad.train.batch_size, bad.train.grad_accum_steps = 32, 8
  bad.mesh.shape = "data=2,fsdp=4"
  out["error_micro"] = config_error(bad)

  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:4])
