"""bipe-compare on hand-made work dirs: grouping over seeds, statistics, sorting, files."""
import json
import os
import subprocess
import sys

import pytest

from bipe_jax import compare
from tiny import REPO

LENGTHS = (64, 128, 256)


def _write(root, name, kind, seed, ppls=None, arith=None, d_model=128):
  d = os.path.join(root, name)
  os.makedirs(d)
  config = {"seed": seed, "pe": {"kind": kind}, "model": {"d_model": d_model},
            "data": {"seq_len": 64, "cache_dir": f"/somewhere/{seed}"},
            "eval": {"lengths": list(LENGTHS)}}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)
  result = {"pe_kind": kind, "train_length": 64, "step": 10}
  if ppls is not None:
    result["results"] = [{"length": L, "ppl": p} for L, p in zip(LENGTHS, ppls)]
  if arith is not None:
    result.update(train_max_ops=2, arithmetic=[
        {"n": n, "answer_acc": a, "chain_acc": c, "examples": 10} for n, (a, c) in enumerate(arith, 1)])
  with open(os.path.join(d, "eval.json"), "w") as f:
    json.dump(result, f)
  return d


@pytest.fixture()
def sweep_root(tmp_path):
  root = str(tmp_path / "sweep")
  # rope degrades fastest; bipe_rope best at 256; alibi has one seed only.
  _write(root, "pe.kind=rope__seed=0", "rope", 0, [10.0, 20.0, 40.0])
  _write(root, "pe.kind=rope__seed=1", "rope", 1, [12.0, 22.0, 60.0])
  _write(root, "pe.kind=bipe_rope__seed=0", "bipe_rope", 0, [11.0, 11.0, 11.0])
  _write(root, "pe.kind=bipe_rope__seed=1", "bipe_rope", 1, [9.0, 13.0, 15.0])
  _write(root, "pe.kind=alibi__seed=0", "alibi", 0, [10.0, 12.0, 14.0])
  os.makedirs(os.path.join(root, "data"))  # a shared cache dir, not a run
  return root


def test_table_groups_seeds_and_sorts(sweep_root):
  md = compare.compare([sweep_root], out=os.path.join(sweep_root, "cmp"))
  rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| run")]
  # Means at 256: alibi 14 (one seed), bipe_rope 13 (sd of 11, 15 = 2.83), rope 50 (sd 14.14).
  assert rows == [
      "| bipe_rope | 2 | 10.00 ± 1.41 | 12.00 ± 1.41 | 13.00 ± 2.83 |",
      "| alibi | 1 | 10.00 | 12.00 | 14.00 |",
      "| rope | 2 | 11.00 ± 1.41 | 21.00 ± 1.41 | 50.00 ± 14.14 |",
  ]
  assert "| run | seeds | 64 (1x) | 128 (2x) | 256 (4x) |" in md
  assert "sorted by the mean at 256 tokens" in md
  with open(os.path.join(sweep_root, "cmp.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert open(os.path.join(sweep_root, "cmp.md")).read() == md


def test_label_names_every_varying_key(tmp_path):
  root = str(tmp_path)
  _write(root, "a", "rope", 0, [1.0, 2.0, 3.0], d_model=64)
  _write(root, "b", "rope", 0, [1.0, 2.0, 4.0], d_model=128)
  _write(root, "c", "alibi", 0, [1.0, 2.0, 5.0], d_model=128)
  md = compare.compare([os.path.join(root, "*")])
  labels = [l.split(" | ")[0][2:] for l in md.splitlines() if l.startswith("| ") and "run" not in l]
  assert labels == ["model.d_model=64, pe.kind=rope", "model.d_model=128, pe.kind=rope",
                    "model.d_model=128, pe.kind=alibi"]
  assert os.path.isfile(os.path.join(root, "compare.png"))  # default prefix: the common parent


def test_arithmetic_tables(tmp_path):
  root = str(tmp_path)
  # train_max_ops = 2: sorted by mean answer accuracy on n = 3, 4.
  _write(root, "r0", "rope", 0, arith=[(1.0, 1.0), (0.9, 0.8), (0.2, 0.1), (0.0, 0.0)])
  _write(root, "r1", "rope", 1, arith=[(1.0, 0.9), (0.7, 0.6), (0.4, 0.1), (0.2, 0.0)])
  _write(root, "b0", "bipe_rope", 0, arith=[(1.0, 1.0), (1.0, 1.0), (0.6, 0.5), (0.5, 0.3)])
  md = compare.compare([root])
  answer, chain = md.split("exact whole chain")
  assert "| bipe_rope | 1 | 100 | 100 | 60 | 50 |" in answer
  assert "| rope | 2 | 100 ± 0 | 80 ± 14 | 30 ± 14 | 10 ± 14 |" in answer
  assert answer.index("| bipe_rope") < answer.index("| rope")
  assert "| rope | 2 | 95 ± 7 | 70 ± 14 | 10 ± 0 | 0 ± 0 |" in chain
  assert os.path.isfile(os.path.join(root, "compare_arithmetic.png"))


def test_cli(sweep_root, tmp_path):
  r = subprocess.run([sys.executable, "-m", "bipe_jax.compare", os.path.join(sweep_root, "pe.kind=*"),
                      f"--out={tmp_path / 'x'}"], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr
  assert "| bipe_rope | 2 |" in r.stdout and (tmp_path / "x.png").is_file()
  r = subprocess.run([sys.executable, "-m", "bipe_jax.compare", str(tmp_path / "empty*")],
                     capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 2 and r.stderr.startswith("error: no eval.json found")
