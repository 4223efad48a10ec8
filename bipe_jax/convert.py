"""bipe-convert: an authors' release checkpoint -> an orbax checkpoint of ours.

    python -m bipe_jax.convert --hf_checkpoint=DIR --workdir=OUT

Writes
  OUT/checkpoints/0/state   orbax StandardSave of {"params": params}
  OUT/checkpoints/0/data    empty JSON (the trainer's item names: state, data)
  OUT/config.json           the experiment config reproducing the release
  OUT/model.json            the ModelConfig fields (as bipe_jax.checkpoint does)
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags
import orbax.checkpoint as ocp

from bipe_jax.interop import release


def convert(hf_checkpoint: str, workdir: str) -> str:
  """Imports `hf_checkpoint` and writes it under `workdir`; returns the step dir."""
  imported = release.load(hf_checkpoint)
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(os.path.join(ckpt_dir, "0")):
    raise FileExistsError(f"{ckpt_dir}/0 already exists; use a new --workdir")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(imported.config.to_json(indent=1))
  with open(os.path.join(workdir, "model.json"), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(imported.model_cfg), f, indent=1)
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(ckpt_dir, options=options,
                             item_names=("state", "data")) as manager:
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": imported.params}),
        data=ocp.args.JsonSave({})))
    manager.wait_until_finished()
  return os.path.join(ckpt_dir, "0")


def define_flags() -> None:
  flags.DEFINE_string("hf_checkpoint", None, "Release directory: config.json + "
                      "model.safetensors (+ tokenizer.model).")
  flags.DEFINE_string("workdir", None, "Output work dir for the orbax checkpoint.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.hf_checkpoint or not f.workdir:
    raise app.UsageError("--hf_checkpoint=DIR and --workdir=OUT are required")
  try:
    step_dir = convert(f.hf_checkpoint, f.workdir)
  except (release.ReleaseError, OSError) as e:
    raise app.UsageError(str(e)) from None
  print(f"wrote {step_dir}")


def run() -> None:
  """Console entry point `bipe-convert`."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
