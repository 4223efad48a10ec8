"""Runs one program's entry point on many command lines in one process (for test_cli.py).

    python tests/cli_driver.py bipe_jax.train CASES.json

CASES.json holds a list of argument lists; prints a JSON list with, per case,
the exit code (0 when run() returned), what it wrote to stderr, and the
traceback of any exception that escaped run().
"""
import contextlib
import importlib
import io
import json
import sys
import traceback


def main(module_name: str, cases_path: str) -> None:
  module = importlib.import_module(module_name)
  with open(cases_path) as f:
    cases = json.load(f)
  results = []
  for args in cases:
    err, out = io.StringIO(), io.StringIO()
    code, escaped = 0, ""
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      try:
        module.run([f"{module_name.replace('.', '/')}.py", *args])
      except SystemExit as e:
        code = e.code
      except BaseException:  # pylint: disable=broad-except
        code, escaped = "exception", traceback.format_exc()
    results.append({"args": args, "code": code, "stderr": err.getvalue(),
                    "traceback": escaped})
  print(json.dumps(results))


if __name__ == "__main__":
  main(*sys.argv[1:])
