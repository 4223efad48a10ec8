"""A tiny config on a few real standard-library files, shared by the training tests."""
import os
import sysconfig

from bipe_jax import config as config_lib
from configs import quickstart

STDLIB = sysconfig.get_paths()["stdlib"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=40, **pe):
  c = quickstart.get_config()
  c.data.source = f"{STDLIB}/json/*.py,{STDLIB}/email/*.py"
  c.tokenizer.vocab_size = 320
  c.tokenizer.sample_bytes = 300_000
  c.data.seq_len = 32
  c.pe.max_intra = 32
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 64, 2, 4, 2
  c.model.d_ff = 128
  c.train.batch_size = 8
  c.train.steps = steps
  c.train.warmup_steps = 5
  c.train.lr = 3e-3
  c.train.log_every = 10
  c.train.checkpoint_every = 20
  c.eval.lengths = (32, 64)
  c.eval.max_tokens = 2048
  c.eval.batch_tokens = 1024
  for k, v in pe.items():
    setattr(c.pe, k, v)
  return c


def cli_args(config) -> list[str]:
  """`--config=configs/quickstart.py --config.K=V ...` reproducing `config` on the CLI."""
  base = config_lib.flat_keys(quickstart.get_config())
  args = [f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}"]
  for k, v in config_lib.flat_keys(config).items():
    if v != base[k] and not isinstance(v, (tuple, list)):
      args.append(f"--config.{k}={v}")
  return args


def train_losses(model, tx, batches, steps: int, check_params=None):
  """Losses of `steps` jitted optimizer steps over stacked batches [steps, ...].

  `check_params(params)` (optional) sees the initial parameters.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from bipe_jax.model import loss_fn

  def run(key, batches):
    params = nn.meta.unbox(model.init(key, jax.tree.map(lambda x: x[0], batches))["params"])
    if check_params is not None:
      check_params(params)

    def step(carry, xs):
      params, opt_state = carry
      batch, i = xs
      def loss(p):
        logits = model.apply({"params": p}, batch, train=True,
                             rngs={"positions": jax.random.fold_in(key, i)})
        return loss_fn(logits, batch["targets"], batch["loss_mask"])[0]
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value
    return jax.lax.scan(step, (params, tx.init(params)), (batches, jnp.arange(steps)))[1]
  return np.asarray(jax.jit(run)(jax.random.key(0), batches))
