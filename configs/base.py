"""Every config key at its default, as a config file (`--config=configs/base.py`).

The defaults live in the package, `bipe_jax/configs/base.py`; experiment
configs import them from there.
"""
from bipe_jax.configs.base import get_config  # pylint: disable=unused-import
