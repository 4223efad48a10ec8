"""Train state, optimizer, and the jitted train and evaluation steps for one config."""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay_mask))


def dummy_batch(batch_size: int, seq_len: int) -> dict:
  z = np.zeros((batch_size, seq_len), np.int32)
  return dict(tokens=z, targets=z, intra=z, inter=z, positions=z, doc_ids=z,
              loss_mask=np.ones((batch_size, seq_len), np.float32))


class Trainer:
  """Owns the model, optimizer and the jitted functions for one config."""

  def __init__(self, config, vocab_size: int):
    self.config = config
    self.model_cfg = ModelConfig.from_config(config, vocab_size)
    self.model = Decoder(self.model_cfg)
    self.tx = make_optimizer(config.train)
    self.init = jax.jit(self._init)
    # The old state is dead after a step: donate it so params update in place.
    self.step = jax.jit(self._step, donate_argnums=0)

  def _init(self, key) -> TrainState:
    variables = self.model.init(key, dummy_batch(1, self.config.data.seq_len))
    params = nn.meta.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self._init, jax.random.key(0))

  def _step(self, state: TrainState, batch: dict, key) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(key, state.step)

    def loss_of(params):
      logits = self.model.apply({"params": params}, batch, train=True,
                                rngs={"positions": rng})
      return loss_fn(logits, batch["targets"], batch["loss_mask"])

    (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
    if self.config.train.on_nonfinite == "skip":
      # Keep the old params and moments; only the step counter moves on.
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}

  def eval_loss(self, params, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(summed nll, token count) of a batch; jitted by the caller."""
    logits = self.model.apply({"params": params}, batch)
    mean, count = loss_fn(logits, batch["targets"], batch["loss_mask"])
    return mean * count, count
