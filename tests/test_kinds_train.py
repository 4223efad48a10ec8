"""Every pe.kind trains a few steps from the quickstart config (tiny shapes)."""
import numpy as np
import pytest

from bipe_jax import encodings, train
from tiny import tiny_config


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))   # tokenizer + tokens shared by all kinds


@pytest.mark.parametrize("kind", sorted(encodings.KINDS))
def test_every_kind_trains_a_few_steps(kind, data_cache, tmp_path):
  c = tiny_config(steps=3, kind=kind)
  c.model.n_layers = 1
  c.data.cache_dir = data_cache
  c.train.log_every, c.train.checkpoint_every = 1, 3
  out = train.train(c, str(tmp_path))
  losses = out["losses"]
  assert sorted(losses) == [1, 2, 3]
  assert all(np.isfinite(v) for v in losses.values())
  # A 320-piece model starts near log(320) = 5.77 and must not start far off it.
  assert abs(losses[1] - np.log(320)) < 0.5, losses
