"""Device meshes, logical-axis rules and the multi-controller runtime.

The mesh has three axes, outermost first: `data` (pure data parallelism),
`fsdp` (data parallelism with parameters and optimizer state sharded), `tensor`
(Megatron-style model parallelism, innermost so it rides the fastest links).
Parameters and activations carry logical axis names (bipe_jax.model); the
rules in `config.mesh.rules` map those names to mesh axes. This is the only
module that creates meshes.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from collections.abc import Mapping

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def parse_shape(spec, key: str = "mesh.shape") -> dict[str, int]:
  """{axis: size} from "data=2,fsdp=-1" or a mapping; unnamed axes are 1.

  When no axis is -1, `data` takes the remaining devices unless it is named:
  "fsdp=8" means data=-1, fsdp=8, tensor=1.
  """
  if isinstance(spec, Mapping):
    items = [(str(k), v) for k, v in spec.items()]
  else:
    items = []
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
      name, eq, value = part.partition("=")
      if not eq:
        raise ValueError(f"{key}={spec!r}: {part!r} is not AXIS=SIZE; "
                         f"example: data=2,fsdp=2,tensor=2")
      items.append((name.strip(), value.strip()))
  shape = dict.fromkeys(AXES, 1)
  for name, value in items:
    if name not in AXES:
      raise ValueError(f"{key}={spec!r}: unknown mesh axis {name!r}; axes: {', '.join(AXES)}")
    try:
      size = int(value)
    except (TypeError, ValueError):
      raise ValueError(f"{key}={spec!r}: size of {name!r} must be an integer, got {value!r}") from None
    if size == 0 or size < -1:
      raise ValueError(f"{key}={spec!r}: size of {name!r} must be positive or -1, got {size}")
    shape[name] = size
  if sum(v == -1 for v in shape.values()) > 1:
    raise ValueError(f"{key}={spec!r}: at most one axis may be -1")
  if -1 not in shape.values() and "data" not in dict(items):
    shape["data"] = -1
  return shape


def resolve_shape(shape: dict[str, int], n_devices: int, key: str = "mesh.shape",
                  spec=None, unit: str = "devices") -> tuple[int, ...]:
  """Sizes in AXES order with -1 filled so that the product is `n_devices` (or slices)."""
  fixed = math.prod(v for v in shape.values() if v != -1)
  shown = spec if spec is not None else ",".join(f"{k}={v}" for k, v in shape.items())
  if -1 in shape.values():
    if n_devices % fixed:
      raise ValueError(f"{key}={shown!r} needs a multiple of {fixed} {unit}, but there "
                       f"are {n_devices}: {fixed} does not divide {n_devices}")
    return tuple(n_devices // fixed if shape[a] == -1 else shape[a] for a in AXES)
  if fixed != n_devices:
    raise ValueError(f"{key}={shown!r} covers {fixed} {unit}, but there are {n_devices}; "
                     f"set one axis to -1 to take the remaining {unit}")
  return tuple(shape[a] for a in AXES)


def _num_slices(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_sizes(config, devices=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici sizes, dcn sizes) in AXES order; the mesh axis sizes are their products.

  DCN axes span TPU slices (multi-slice training); without `mesh.dcn_shape`
  several slices go along `data`, the axis that needs the least bandwidth.
  """
  devices = jax.devices() if devices is None else devices
  slices = _num_slices(devices)
  dcn_spec = config.mesh.dcn_shape or ("data=-1" if slices > 1 else "")
  dcn = resolve_shape(parse_shape(dcn_spec, "mesh.dcn_shape"), slices, "mesh.dcn_shape",
                      dcn_spec, "slices") if dcn_spec else (1,) * len(AXES)
  ici = resolve_shape(parse_shape(config.mesh.shape), len(devices) // slices,
                      spec=config.mesh.shape)
  return ici, dcn


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh `config.mesh` asks for, over `devices` (default: all, every process)."""
  devices = jax.devices() if devices is None else list(devices)
  ici, dcn = mesh_sizes(config, devices)
  # Auto axes: the compiler propagates shardings from the jit boundary and the
  # logical constraints; nothing in the model needs explicit-sharding types.
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  if math.prod(dcn) > 1:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)
  return jax.make_mesh(ici, AXES, axis_types=axis_types, devices=devices)


def rules(config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """`config.mesh.rules` as flax wants them (config.json turns tuples into lists)."""
  out = []
  for rule in config.mesh.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"mesh.rules entry {rule!r} must be (logical_name, mesh_axes)")
    name, target = rule
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      bad = [t for t in target if t not in AXES]
    else:
      bad = [] if target is None or target in AXES else [target]
    if bad:
      raise ValueError(f"mesh.rules entry {rule!r} names unknown mesh axes {bad}; "
                       f"axes: {', '.join(AXES)}")
    out.append((name, target))
  return tuple(out)


def batch_axes(rule_list) -> tuple[str, ...]:
  """Mesh axes the logical `batch` axis is split over (the data-parallel axes)."""
  for name, target in rule_list:
    if name == "batch":
      return () if target is None else (target,) if isinstance(target, str) else target
  return ()


def data_parallel_size(sizes: Mapping[str, int], rule_list) -> int:
  return math.prod(sizes[a] for a in batch_axes(rule_list))


def logical_shardings(logical_specs, shapes, mesh, rule_list):
  """NamedShardings for a tree of logical PartitionSpecs and matching shapes.

  A mesh axis that does not divide its array dimension is dropped (that
  dimension replicated) with a warning, so an odd vocabulary or head count
  never stops a run; everything else is laid out exactly as the rules say.
  """
  def one(spec, shaped):
    mesh_spec = nn.logical_to_mesh_axes(spec, rule_list)
    dims = []
    for size, axes in zip(shaped.shape, tuple(mesh_spec) + (None,) * len(shaped.shape)):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      n = math.prod(mesh.shape[a] for a in names)
      if size % n:
        logging.warning("dimension of size %d is not divisible by mesh axes %s (%d "
                        "devices): replicated instead (logical spec %s)", size, names, n, spec)
        axes = None
      dims.append(axes)
    return NamedSharding(mesh, P(*dims))
  return jax.tree.map(one, logical_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, rows: int) -> tuple[int, int]:
  """(shard index, shard count): this process supplies rows [i*rows/n, (i+1)*rows/n).

  With the batch split over processes, each process loads only its own block
  of the global batch; where the batch is replicated across processes (no
  data axis crosses them) every process loads all of it (0, 1).
  """
  held = sharding.addressable_devices_indices_map((rows,)).values()
  starts = [s[0].indices(rows)[0] for s in held]
  stops = [s[0].indices(rows)[1] for s in held]
  lo, hi = min(starts), max(stops)
  if sum(b - a for a, b in set(zip(starts, stops))) != hi - lo or rows % (hi - lo) or lo % (hi - lo):
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(set(zip(starts, stops)))} "
                     f"of a batch of {rows}: not one aligned block; order the mesh so each "
                     "process's devices are adjacent along the data axes")
  return lo // (hi - lo), rows // (hi - lo)


def global_batch(local: dict, sharding: NamedSharding, rows: int) -> dict:
  """Global [rows, ...] arrays from this process's block of rows (see process_rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (rows,) + np.shape(v)[1:])
          for k, v in local.items()}


def replicated_batch(full: dict, sharding: NamedSharding) -> dict:
  """Global arrays from a batch every process holds in full (evaluation)."""
  return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda idx, v=v: v[idx])
          for k, v in full.items()}


# Multi-controller runtime -------------------------------------------------------

def _slurm_tasks() -> int:
  # Inside `srun` only: sbatch's own shell also has SLURM_JOB_ID but no step.
  if "SLURM_JOB_ID" not in os.environ or "SLURM_STEP_NODELIST" not in os.environ:
    return 0
  return int(os.environ.get("SLURM_NTASKS", "1"))


def _tpu_chips() -> int:
  """Google TPU PCI devices on this host (what jax itself looks for)."""
  n = 0
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        n += f.read().strip() == "0x1ae0"
    except OSError:
      pass
  return n


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, mode: str = "auto") -> bool:
  """Joins this process to a multi-process jax runtime; True when it did.

  Explicit coordinator flags win. Otherwise, in mode "auto", jax's own
  cluster detection runs where a cluster is evident (a SLURM step with several
  tasks, a Cloud TPU VM); "yes" always runs it (Open MPI, Kubernetes, ...);
  "no" never. Must run before anything touches a jax backend.
  """
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"--distributed={mode!r}; valid: auto, yes, no")
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if explicit:
    if not (coordinator_address and num_processes > 0 and process_id >= 0):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                       f"got {coordinator_address!r}, {num_processes}, {process_id}")
    if process_id >= num_processes:
      raise ValueError(f"--process_id={process_id} must be below --num_processes={num_processes}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif mode == "yes" or (mode == "auto" and (_slurm_tasks() > 1 or _tpu_chips())):
    kwargs = {}
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    if _slurm_tasks() and per_node == "1" and gpus.isdigit():
      # jax would give a SLURM task only GPU <local id>; one task per node drives all of them.
      kwargs["local_device_ids"] = list(range(int(gpus)))
    jax.distributed.initialize(**kwargs)
  else:
    return False
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def define_flags() -> None:
  """The launch flags every multi-process entry point takes (bipe-train, bipe-eval)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for an explicit "
                      "multi-process launch (with --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes in an explicit launch.")
  flags.DEFINE_integer("process_id", -1, "This process's index in an explicit launch.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                    "auto: join a multi-process run on SLURM / Cloud TPU when detected; "
                    "yes: always let jax detect the cluster; no: single process.")


def initialize_from_flags() -> bool:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                                f.distributed)


@contextlib.contextmanager
def process_zero_first(name: str):
  """Process 0 runs the block first; the others start once it is done.

  For work whose results land on a shared disk (tokenizer, corpus cache,
  model.json): the others then read them instead of racing to write them.
  """
  multi = jax.process_count() > 1
  if multi and jax.process_index() != 0:
    multihost_utils.sync_global_devices(name)
  yield
  if multi and jax.process_index() == 0:
    multihost_utils.sync_global_devices(name)


def gather_process_states(state: dict) -> dict:
  """Every process's JSON-able data-iterator state, for a checkpoint item process 0 writes.

  Hosts read different shards, so their iterator positions can differ
  (document packing); a checkpoint must hold all of them. A collective:
  every process calls it at the same step.
  """
  if jax.process_count() == 1:
    return state
  blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(blob)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(blob)] = blob
  blobs = multihost_utils.process_allgather(padded)
  return {"per_process": [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, lengths)]}


def own_process_state(saved: dict) -> dict:
  """This process's part of what gather_process_states saved."""
  if "per_process" not in saved:
    return saved
  states = saved["per_process"]
  if all(s == states[0] for s in states):
    return states[0]  # window packing: every shard is at the same position
  if len(states) != jax.process_count():
    logging.warning("the data state was saved by %d processes and this run has %d: "
                    "each resumes from saved process 0's position, so some rows of "
                    "the epoch repeat or are skipped", len(states), jax.process_count())
    return states[0]
  return states[jax.process_index()]
