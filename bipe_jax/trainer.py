"""Train state, optimizer, and the jitted, sharded train and evaluation steps.

The state is built abstractly first (`jax.eval_shape`), its shardings come
from the parameters' logical axis names and `config.mesh.rules`, and the
initialiser is jitted to produce it already laid out on the mesh. One device
is simply a 1x1x1 mesh: the same code path trains on a laptop and a pod.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bipe_jax import sharding
from bipe_jax.global_norm import clip_by_global_norm, global_norm
from bipe_jax.model import Decoder, ModelConfig, loss_fn


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState


def lr_schedule(t) -> optax.Schedule:
  """Linear warm-up to `t.lr`, then polynomial or cosine decay to lr * end_lr_factor."""
  end = t.lr * t.end_lr_factor
  decay_steps = max(t.steps - t.warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
  if t.schedule == "cosine":
    decay = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.end_lr_factor)
  else:
    decay = optax.polynomial_schedule(t.lr, end, t.poly_power, decay_steps)
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def make_optimizer(t) -> optax.GradientTransformation:
  # Decay matrices only (not norms), as the release's Trainer does.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      clip_by_global_norm(t.clip_norm),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay_mask))


def dummy_batch(batch_size: int, seq_len: int, levels: int = 2) -> dict:
  z = np.zeros((batch_size, seq_len), np.int32)
  out = dict(tokens=z, targets=z, intra=z, inter=z, positions=z, doc_ids=z,
             loss_mask=np.ones((batch_size, seq_len), np.float32))
  if levels > 2:
    out["levels"] = np.zeros((batch_size, levels - 2, seq_len), np.int32)
  return out


def micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...]; micro-batch j holds rows j, j+k, j+2k, ...

  Strided rather than contiguous so every device keeps its own rows in every
  micro-batch: splitting a data-sharded batch moves no data.
  """
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


class Trainer:
  """Owns the model, optimizer, mesh, shardings and the jitted functions for one config.

  `mesh` defaults to `sharding.make_mesh(config)` over every device of every
  process; pass another to restore or evaluate on a different layout.
  """

  def __init__(self, config, vocab_size: int, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.model_cfg = ModelConfig.from_config(config, vocab_size)
    self.rules = sharding.rules(config)
    self.model = Decoder(self.model_cfg, activation_rules=self.rules)
    self.tx = make_optimizer(config.train)
    self.accum = int(config.train.grad_accum_steps)
    self.mesh = sharding.make_mesh(config) if mesh is None else mesh
    self.batch_size = int(config.train.batch_size)
    self.state_sharding = self._state_sharding()
    self.param_sharding = self.state_sharding.params
    self.batch_sharding = NamedSharding(self.mesh, P(sharding.batch_axes(self.rules)))
    self.dp = sharding.data_parallel_size(dict(self.mesh.shape), self.rules)
    repl = sharding.replicated(self.mesh)
    # State comes out of init already sharded by the rules: it never exists whole on one device.
    self._init_jit = jax.jit(self._init, out_shardings=self.state_sharding)
    # The old state is dead after a step: donate it so params update in place.
    self._step_jit = jax.jit(self._step, donate_argnums=0,
                             in_shardings=(self.state_sharding, self.batch_sharding, repl),
                             out_shardings=(self.state_sharding, repl))
    self._eval_jit = jax.jit(self.eval_loss, in_shardings=(self.param_sharding, self.batch_sharding),
                             out_shardings=(repl, repl))

  # State ------------------------------------------------------------------------

  def _boxed_params(self, key):
    return self.model.init(key, dummy_batch(1, self.config.data.seq_len,
                                            self.config.pe.levels))["params"]

  def _init(self, key) -> TrainState:
    params = nn.meta.unbox(self._boxed_params(key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  def _state_sharding(self) -> TrainState:
    key = jax.random.key(0)
    shapes = jax.eval_shape(self._init, key)
    specs = nn.get_partition_spec(jax.eval_shape(self._boxed_params, key))
    params = sharding.logical_shardings(specs, shapes.params, self.mesh, self.rules)
    repl = sharding.replicated(self.mesh)
    # Adam moments live where their parameters do; counters are replicated.
    opt = optax.tree_map_params(self.tx, lambda _, s: s, shapes.opt_state, params,
                                transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=params, opt_state=opt)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and target shardings: what a checkpoint restores onto."""
    shapes = jax.eval_shape(self._init, jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sharding)

  def init(self, key) -> TrainState:
    # Outside the mesh: activation constraints are no-ops while init traces a
    # 1-row dummy batch, whose activations need no layout.
    return self._init_jit(key)

  # Training ---------------------------------------------------------------------

  def data_shard(self) -> dict:
    """shard_index / shard_count of the rows this process loads per global batch."""
    index, count = sharding.process_rows(self.batch_sharding, self.batch_size)
    return {"shard_index": index, "shard_count": count}

  def global_batch(self, local: dict) -> dict:
    """The global batch, sharded over the data axes, from this process's rows."""
    return sharding.global_batch(local, self.batch_sharding, self.batch_size)

  def step(self, state: TrainState, batch: dict, key) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (see global_batch); state is donated."""
    with jax.set_mesh(self.mesh):
      return self._step_jit(state, batch, key)

  def compiled_step(self, state: TrainState, batch: dict, key, compiler_options=None):
    """`step` compiled ahead of time for these shapes, with XLA `compiler_options` if given.

    Returns a function of (state, batch, key) like `step`; benchmarks use it to
    compare compiler options within one process.
    """
    with jax.set_mesh(self.mesh):
      compiled = self._step_jit.lower(state, batch, key).compile(compiler_options=compiler_options)

    def run(state, batch, key):
      with jax.set_mesh(self.mesh):
        return compiled(state, batch, key)
    return run

  def _grads(self, params, batch, rng):
    def loss_of(p):
      logits = self.model.apply({"params": p}, batch, train=True, rngs={"positions": rng})
      return loss_fn(logits, batch["targets"], batch["loss_mask"])
    return jax.value_and_grad(loss_of, has_aux=True)(params)

  def _step(self, state: TrainState, batch: dict, key) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(key, state.step)
    if self.accum == 1:
      (loss, count), grads = self._grads(state.params, batch, rng)
    else:
      loss, count, grads = self._accumulate(state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(global_norm(params))
    if self.config.train.on_nonfinite == "skip":
      # Keep the old params and moments; only the step counter moves on.
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}

  def _accumulate(self, params, batch, rng):
    """Token-weighted mean loss and gradient over `accum` micro-batches, in a scan.

    Each micro-batch contributes its summed loss, so the result equals one
    step on the whole batch however the loss-mask tokens fall.
    """
    micro = micro_batches(batch, self.accum)
    micro = jax.lax.with_sharding_constraint(
        micro, NamedSharding(self.mesh, P(None, sharding.batch_axes(self.rules))))

    def body(carry, xs):
      grads_sum, nll_sum, count_sum = carry
      mb, j = xs
      (mean, count), grads = self._grads(params, mb, jax.random.fold_in(rng, j))
      grads_sum = jax.tree.map(lambda a, g: a + g * count, grads_sum, grads)
      # Keep the running sum laid out like the parameters (reduce-scatter under fsdp).
      grads_sum = jax.lax.with_sharding_constraint(grads_sum, self.param_sharding)
      return (grads_sum, nll_sum + mean * count, count_sum + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, nll, count), _ = jax.lax.scan(
        body, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(self.accum)))
    denom = jnp.maximum(count, 1.0)
    return nll / denom, count, jax.tree.map(lambda g: g / denom, grads)

  # Evaluation -------------------------------------------------------------------

  def eval_loss(self, params, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(summed nll, token count) of a batch; eval_step is its jitted, sharded form."""
    logits = self.model.apply({"params": params}, batch)
    mean, count = loss_fn(logits, batch["targets"], batch["loss_mask"])
    return mean * count, count

  def eval_step(self, params, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """eval_loss of a batch every process holds in full, of any number of rows.

    Rows are padded (loss_mask 0, so they add nothing) to a multiple of the
    data-parallel size and split over the data axes like training batches.
    """
    rows = len(batch["tokens"])
    pad = -rows % self.dp
    if pad:
      batch = {k: np.pad(np.asarray(v), [(0, pad)] + [(0, 0)] * (np.ndim(v) - 1))
               for k, v in batch.items()}
    with jax.set_mesh(self.mesh):
      return self._eval_jit(params, sharding.replicated_batch(batch, self.batch_sharding))
