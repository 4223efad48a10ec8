"""bipe-convert: an authors' release checkpoint <-> an orbax checkpoint of ours.

    python -m bipe_jax.convert --hf_checkpoint=DIR --workdir=OUT
    python -m bipe_jax.convert --to_hf=OUT --workdir=DIR   (export, interop.export)

Writes a work dir like bipe-train's: OUT/config.json (the experiment config
reproducing the release) and OUT/checkpoints/0 holding a train
state (imported params, fresh optimizer state), so `bipe-eval --workdir=OUT`
evaluates it and `bipe-train --workdir=OUT` continues training it.
"""
from __future__ import annotations

import os

from absl import flags
import jax
import jax.numpy as jnp

from bipe_jax import checkpoint, cli
from bipe_jax import config as config_lib
from bipe_jax.interop import export, release
from bipe_jax.trainer import Trainer, TrainState


def convert(hf_checkpoint: str, workdir: str) -> str:
  """Imports `hf_checkpoint` and writes it under `workdir`; returns the step dir."""
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # A run already there (its config.json, any checkpoint) is never overwritten.
  held = [p for p in (os.path.join(workdir, "config.json"), ckpt_dir)
          if os.path.exists(p) and not (os.path.isdir(p) and not os.listdir(p))]
  if held:
    raise FileExistsError(f"--workdir={workdir} already holds a run ({', '.join(held)}); "
                          "use a new --workdir")
  imported = release.load(hf_checkpoint)
  # Without the release's tokenizer, later commands on the run would train a new one
  # on whatever corpus they see, and its ids would not be the model's.
  if not os.path.isfile(os.path.join(hf_checkpoint, "tokenizer.model")):
    raise release.ReleaseError(f"--hf_checkpoint={hf_checkpoint} has no tokenizer.model: copy "
                               "the release's Llama tokenizer.model into it, then convert")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(imported.config.to_json(indent=1))
  trainer = Trainer(imported.config, imported.model_cfg.vocab_size)
  params = jax.device_put(imported.params, trainer.param_sharding)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=trainer.tx.init(params))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    ckpt.save(0, state, {}, force=True)
  finally:
    ckpt.close()
  return os.path.join(ckpt_dir, "0")


def define_flags() -> None:
  flags.DEFINE_string("hf_checkpoint", None, "Release directory: config.json + "
                      "model.safetensors + tokenizer.model.")
  flags.DEFINE_string("workdir", None, "Output work dir for the orbax checkpoint (with "
                      "--to_hf: the work dir to export).")
  flags.DEFINE_string("to_hf", None, "Export --workdir's latest checkpoint (bipe_rope or "
                      "rope) to this directory in the release's HF Llama layout.")


def main(overrides) -> None:
  f = flags.FLAGS
  if f.to_hf is not None:
    if f.hf_checkpoint is not None:
      raise config_lib.ConfigError("--to_hf exports and --hf_checkpoint imports; pass one")
    cli.required("--to_hf=OUT --workdir=runs/quickstart", workdir=f.workdir)
    if overrides:
      raise config_lib.ConfigError(f"bipe-convert --to_hf takes no --config.KEY=VALUE "
                                   f"({overrides[0][0]}): it exports the model as trained")
    print(f"wrote {export.export(f.workdir, f.to_hf)}")
    return
  cli.required("--hf_checkpoint=RELEASE_DIR --workdir=OUT", hf_checkpoint=f.hf_checkpoint,
               workdir=f.workdir)
  if overrides:
    raise config_lib.ConfigError(
        f"bipe-convert takes no --config.KEY=VALUE ({overrides[0][0]}): the release's "
        "config.json fixes the model; change evaluation or training settings with "
        "bipe-eval / bipe-train on the converted --workdir")
  print(f"wrote {convert(f.hf_checkpoint, f.workdir)}")


def run(argv=None) -> None:
  """Console entry point `bipe-convert`."""
  cli.run(main, define_flags, argv)


if __name__ == "__main__":
  run()
