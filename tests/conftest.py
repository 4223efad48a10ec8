"""Shared pytest fixtures: a small real code corpus and a tokenizer trained on it once."""
import os
import shutil
import sysconfig

import pytest

STDLIB = sysconfig.get_paths()["stdlib"]
# A handful of real standard-library modules (about 120 KB of Python).
CODE_FILES = ("json/__init__.py", "json/decoder.py", "json/encoder.py",
              "json/scanner.py", "json/tool.py", "textwrap.py", "bisect.py",
              "heapq.py", "keyword.py", "colorsys.py")


@pytest.fixture(scope="session")
def code_corpus_dir(tmp_path_factory) -> str:
  """Directory holding copies of CODE_FILES (flattened names, sorted)."""
  root = tmp_path_factory.mktemp("code_corpus")
  for rel in CODE_FILES:
    shutil.copy(os.path.join(STDLIB, rel), root / rel.replace("/", "_"))
  return str(root)


@pytest.fixture(scope="session")
def code_texts(code_corpus_dir) -> list:
  return [open(os.path.join(code_corpus_dir, f), encoding="utf-8").read()
          for f in sorted(os.listdir(code_corpus_dir))]


@pytest.fixture(scope="session")
def code_tokenizer(code_texts, tmp_path_factory):
  """A 400-piece tokenizer trained on the code corpus (made once per session)."""
  from bipe_jax.data.tokenizer import train_tokenizer
  prefix = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer")
  return train_tokenizer(code_texts, prefix, vocab_size=400)
