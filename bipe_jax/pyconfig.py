"""Reading what users hand the tools, without JAX: `get_config()` from a Python file
(a config or a sweep file) and JSON files (config.json, eval.json).

launch/sweep.py and bipe-compare use it and stay light: this module imports no JAX.
"""
from __future__ import annotations

import importlib.util
import json
import os

import ml_collections


def load_get_config(path: str, what: str, example: str,
                    error: type = ValueError) -> ml_collections.ConfigDict:
  """`get_config()` of the Python file `path`; anything wrong raises `error` naming
  `what` (e.g. "config file") and the path, with `example` as the fix."""
  if not os.path.isfile(path):
    raise error(f"{what} {path!r} does not exist; pass a file such as {example}")
  spec = importlib.util.spec_from_file_location("_bipe_" + what.replace(" ", "_"), path)
  if spec is None:
    raise error(f"cannot load {what} {path!r}: pass a .py file such as {example}")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except SyntaxError as e:
    raise error(f"{what} {path!r} line {e.lineno}: {e.msg}") from None
  except Exception as e:  # pylint: disable=broad-except
    # The user's own Python: name the file, keep the original message.
    raise error(f"{what} {path!r} failed: {type(e).__name__}: {e}; it must define "
                "get_config() returning an ml_collections.ConfigDict") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise error(f"{what} {path!r}: get_config() returned {type(config).__name__}, "
                "not an ml_collections.ConfigDict")
  return config


def read_json(path: str, fix: str, error: type = ValueError):
  """The JSON value in `path`; a damaged file raises `error` naming the path and `fix`."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise error(f"{path} is damaged (not valid JSON: {e}); {fix}") from None
