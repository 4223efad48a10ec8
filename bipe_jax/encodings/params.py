"""Typed parameters: the base class every kind's parameter class derives from.

Each kind's module defines one small frozen class (RopeParams in rope.py,
FireParams in fire.py, ...). These classes are the one home of every `pe.*`
default and check: field names equal the `pe.*` config keys (and `ModelConfig`
fields) they come from, so `from_fields(obj)` builds one from any object
carrying those names, and the base config and `ModelConfig` take their `pe.*`
keys and defaults from them (`registry.PE_DEFAULTS`). Each class validates
itself on construction, naming the key at fault. A field read from another
config key says so in its metadata (`key`); it is then not a `pe.*` key. A
field whose default is itself a Params (rope_scaling) is a section of keys
(`pe.rope_scaling.kind`, ...): `to_config` / `from_config` convert it.
"""
from __future__ import annotations

import dataclasses
from typing import Any


class ParamError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Params:
  """Base: no parameters (NoPE)."""

  @classmethod
  def from_fields(cls, obj: Any) -> "Params":
    """Reads each field of `cls` as an attribute of `obj` (a ModelConfig)."""
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

  def with_defaults(self, encoding) -> "Params":
    """Resolves kind-dependent defaults (e.g. the ALiBi slope multiplier)."""
    del encoding
    return self

  @classmethod
  def pe_defaults(cls) -> dict:
    """{pe.* key: default} of this class's fields (those read from `pe`)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if "key" not in f.metadata}


def positive(name: str, value) -> None:
  """Raises ParamError naming pe.`name` unless `value` > 0."""
  if not value > 0:
    raise ParamError(f"pe.{name}={value!r} must be > 0")


def to_config(default):
  """A pe.* default as a config value: a nested Params becomes a dict of its keys."""
  return dataclasses.asdict(default) if isinstance(default, Params) else default


def from_config(default, value):
  """A config value (a ConfigDict or dict for a nested Params) as its typed value."""
  if not isinstance(default, Params) or isinstance(value, Params):
    return value
  items = value.to_dict() if hasattr(value, "to_dict") else dict(value)
  return type(default)(**items)
