"""Cached decoding on 8 fake CPU devices (mesh data=2, tensor=4), against one device.

    python tests/decode_multidevice.py OUT.json

Run by tests/test_decode.py in a process of its own (the suite keeps 1 device).
For every kind, writes the largest difference between the cached logits on
the mesh and the full forward pass on one device (and the largest logit), and
the per-device shapes of a sharded parameter and of the KV cache.
"""
import os
import sys

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8",
                                    "--xla_backend_optimization_level=0"])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax.linen as nn
import jax
import numpy as np

from bipe_jax import decode, encodings, sharding
from bipe_jax.configs import base
from bipe_jax.model import Decoder, ModelConfig
import test_decode as T

KINDS = tuple(sorted(encodings.KINDS))   # every kind in the registry


def main(out_path):
  config = base.get_config()
  rules = sharding.rules(config)
  mesh = jax.make_mesh((2, 1, 4), sharding.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  prompts, forced = T._sequences()
  result = {"devices": jax.device_count()}
  for kind in KINDS:
    cfg = ModelConfig(vocab_size=T.V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=32,
                      pe_kind=kind, max_intra=T.MAX_INTRA, max_positions=T.TRAIN_LEN,
                      fire_init_threshold=4.0, attention_impl="chunked", init_std=0.5)
    model = Decoder(cfg)
    z = np.zeros((1, 8), np.int32)
    boxed = model.init(jax.random.key(1), dict(tokens=z, intra=z, inter=z, positions=z,
                                               doc_ids=z))["params"]
    params = nn.meta.unbox(boxed)
    seqs = np.stack([np.concatenate([p, f, np.zeros(len(prompts[0]) - len(p), int)])
                     for p, f in zip(prompts, forced)])
    full = np.asarray(model.apply({"params": params}, T.full_ids(seqs)))
    shardings = sharding.logical_shardings(nn.get_partition_spec(boxed), params, mesh, rules)
    on_mesh = jax.device_put(params, shardings)
    gen = decode.Generator(Decoder(cfg, activation_rules=rules), T._rule(), mesh=mesh,
                           rules=rules)
    out = gen(on_mesh, prompts, forced.shape[1], forced=forced, keep_logits=True)
    width = out.prefill_logits.shape[1]
    err = scale = 0.0
    for b, p in enumerate(prompts):
      got = np.concatenate([out.prefill_logits[b, width - len(p):], out.logits[b, 1:]])
      want = full[b, :len(p) + forced.shape[1] - 1]
      err = max(err, float(np.abs(got - want).max()))
      scale = max(scale, float(np.abs(want).max()))
    if kind == "bipe_rope":
      # Three rows on data=2: a fourth pads the batch and must neither show nor
      # keep the loop running once the real rows have stopped.
      three = prompts + [np.array([T.BOS, 4, 3])]
      alone = decode.Generator(model, T._rule())(params, three, 6)
      stops = {int(t[0]) for t in alone.tokens}
      mesh_out = gen(on_mesh, three, 6)
      stopped = gen(on_mesh, three, 6, stop_tokens=sorted(stops))
      result["three_rows"] = {
          "equal": all(np.array_equal(a, b) for a, b in zip(alone.tokens, mesh_out.tokens)),
          "rows": len(mesh_out.tokens), "decode_tokens_after_stop": stopped.decode_tokens}
    q = on_mesh["layer_0"]["attn"]["q"]["kernel"]
    k_cache = out.cache.k[0]
    result[kind] = {"max_abs_err": err, "max_abs_logit": scale,
                    "q_shard": list(q.addressable_shards[0].data.shape),
                    "k_cache": list(k_cache.shape),
                    "k_cache_shard": list(k_cache.addressable_shards[0].data.shape)}
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1])
