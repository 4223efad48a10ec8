"""What bipe-train, bipe-eval and bipe-convert share: flags, overrides, output, errors.

- `--config.KEY=VALUE` overrides are parsed here, by the type of the value they
  replace, so a bad one fails with a line naming the flag.
- Libraries log at WARNING unless `--verbosity` is given (0: INFO, 1: DEBUG);
  progress lines are printed and reach a pipe (`| tee`) as they happen.
- Bad input (a flag, a config value, a file) ends the program with one line
  `error: ...` on stderr and exit status 2, before any compilation
  (`--verbosity=1` adds the traceback).
"""
from __future__ import annotations

import ast
import faulthandler
import io
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging
import ml_collections

from bipe_jax import checkpoint
from bipe_jax import config as config_lib

EXIT_BAD_INPUT = 2
# What bad input raises anywhere below an entry point (ValueError covers
# ConfigError, ReleaseError and json.JSONDecodeError).
BAD_INPUT = (ValueError, OSError, checkpoint.CheckpointError)
_OVERRIDE = re.compile(r"--config\.([^=]+)(=(.*))?$", re.S)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_defined = {}  # define_flags -> the flag names it defined


def fail(e: Exception | str) -> None:
  """Prints `error: <e>` as one line on stderr and exits with status 2."""
  message = " ".join(str(e).split()) or type(e).__name__
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def run(main: Callable, define_flags: Callable, argv: Sequence[str] | None = None,
        errors: tuple = ()) -> None:
  """Runs `main(overrides)` as a command-line program.

  Args:
    main: called once the flags are parsed and checked, with the
      `--config.KEY=VALUE` overrides as [(KEY, VALUE text)].
    define_flags: defines the program's absl flags (called once per process).
    argv: the command line (default sys.argv).
    errors: exception types besides BAD_INPUT that end the program with exit 2.
  """
  argv = list(sys.argv if argv is None else argv)
  try:
    if define_flags not in _defined:
      app.define_help_flags()
      before = set(flags.FLAGS)
      define_flags()
      _defined[define_flags] = set(flags.FLAGS) - before
    rest, overrides = split_overrides(argv)
    if flags.FLAGS.is_parsed():  # A second run in one process starts from the defaults.
      flags.FLAGS.unparse_flags()
    try:
      rest = flags.FLAGS(rest)
    except flags.Error as e:
      raise config_lib.ConfigError(f"{e}; `{_program(argv)} --helpshort` lists the flags")
    if len(rest) > 1:
      raise config_lib.ConfigError(f"unexpected arguments {rest[1:]}: every option is "
                                   "a --flag=VALUE")
    for name in sorted(_defined[define_flags]):
      if flags.FLAGS[name].present and flags.FLAGS[name].value in ("", []):
        raise config_lib.ConfigError(f"--{name} is empty: give it a value or leave it out")
    _set_up_output()
    main(overrides)
  except BAD_INPUT + tuple(errors) as e:
    logging.debug("where the error was raised:", exc_info=True)  # --verbosity=1 shows it.
    fail(e)


def _program(argv) -> str:
  name = os.path.basename(argv[0]) if argv else ""
  return f"python -m bipe_jax.{name[:-3]}" if name.endswith(".py") else name


def _set_up_output() -> None:
  # Not absl's app.run: it raises an absent --verbosity to INFO, where orbax and
  # grain write thousands of lines around the progress lines. absl's own
  # default, WARNING, stays unless --verbosity is given.
  logging.use_absl_handler()
  if isinstance(sys.stdout, io.TextIOWrapper):  # Not when captured (tests).
    sys.stdout.reconfigure(line_buffering=True)  # `| tee` shows each line at once.
  if isinstance(sys.stderr, io.TextIOWrapper):
    faulthandler.enable()  # A crash in native code still prints where Python was.


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(argv without `--config.KEY=VALUE` items, [(KEY, VALUE)] in order)."""
  rest, overrides = [], []
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if not m:
      rest.append(arg)
    elif m.group(2) is None:
      raise config_lib.ConfigError(f"{arg} has no value: write --config.{m.group(1)}=VALUE")
    else:
      overrides.append((m.group(1), m.group(3)))
  return rest, overrides


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Sets each `--config.KEY=VALUE` on `config` (in place), parsed by the old value's type."""
  flat = config_lib.flat_keys(config)
  for key, text in overrides:
    if key not in flat:
      raise config_lib.ConfigError(config_lib.unknown_key(key, set(flat)))
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = parse_value(key, text, flat[key])
  return config


def parse_value(key: str, text: str, current):
  """`text` as a value of the same type as `current` (the value it replaces).

  bool: true/false (yes/no, on/off, 1/0); int; finite float; str; tuple of
  ints: "128,256" or "(128, 256)"; any other tuple: a Python literal.
  """
  kind = type(current)
  try:
    if kind is bool:
      if text.lower() not in _TRUE + _FALSE:
        raise ValueError
      return text.lower() in _TRUE
    if kind is int:
      return int(text)
    if kind is float:
      value = float(text)
      if not math.isfinite(value):
        raise ValueError
      return value
    if kind in (tuple, list):
      return _parse_tuple(text, current)
    return text
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    raise config_lib.ConfigError(
        f"--config.{key}={text!r} is not {_describe(current)}; e.g. "
        f"--config.{key}={_example(current)}") from None


def _ints_only(current) -> bool:
  return all(isinstance(x, int) and not isinstance(x, bool) for x in current)


def _parse_tuple(text: str, current) -> tuple:
  s = text.strip()
  if s[:1] in "([":
    value = ast.literal_eval(s)
    if not isinstance(value, (tuple, list)):
      raise ValueError
  elif _ints_only(current):
    value = [int(x) for x in s.split(",") if x.strip()]
  else:
    raise ValueError
  if _ints_only(current) and not _ints_only(value):
    raise ValueError
  return tuple(value)


def _describe(current) -> str:
  if isinstance(current, (tuple, list)):
    return ("a comma-separated list of integers" if _ints_only(current)
            else "a Python tuple literal")
  return {bool: "true or false", int: "an integer", float: "a finite number"}.get(
      type(current), "a string")


def _example(current) -> str:
  if isinstance(current, (tuple, list)):
    return (",".join(map(str, current)) or "1,2") if _ints_only(current) else repr(tuple(current))
  return str(current).lower() if isinstance(current, bool) else str(current)


def positive_ints(flag: str, items: Sequence[str], example: str) -> tuple[int, ...]:
  """A list flag's items as positive ints, or a ConfigError naming `--flag`."""
  try:
    values = tuple(int(x) for x in items)
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise config_lib.ConfigError(f"--{flag}={','.join(items)!r} must be a comma-separated "
                                 f"list of positive integers, e.g. --{flag}={example}")
  return values


def required(example: str, **named) -> None:
  """Fails naming every flag in `named` given no (or an empty) value."""
  missing = [f"--{k}" for k, v in named.items() if v is None or v == ""]
  if missing:
    raise config_lib.ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                 f"required, e.g. {example}")
