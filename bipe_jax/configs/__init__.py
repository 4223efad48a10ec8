"""Defaults of every config key, shipped with the package.

Experiment configs (the repository's top-level `configs/*.py`, passed as
`--config=PATH`) start from `bipe_jax.configs.base.get_config()`.
"""
