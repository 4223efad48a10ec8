"""One table and one plot from the eval.json of several work dirs.

    bipe-compare runs/sweeps/stdlib/*  [--out=PREFIX]
    python -m bipe_jax.compare DIR_OR_GLOB ...

Each argument is a work dir holding eval.json, a glob of them, or a directory
whose subdirectories hold them (a sweep root); an argument that yields no
eval.json fails, naming it, and so does a damaged eval.json. Runs whose configs
differ only in `seed`, and that were evaluated alike (the same checkpoint step,
context extension and corpus, as eval.json records them), form one row: mean and
sample standard deviation over the seeds (n = how many). A row is labelled by the config keys that differ between rows
(the encoding, usually). Perplexity rows are sorted by the mean at the longest
length every row has (best first); arithmetic rows by mean answer accuracy on
expressions longer than in training (best first). Writes PREFIX.md with the
tables and PREFIX.png (perplexity against evaluation length, one line per row,
training length marked) and PREFIX_arithmetic.png; PREFIX defaults to
<common parent of the work dirs>/compare.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

from bipe_jax import pyconfig

IGNORED_KEYS = ("seed", "data.cache_dir")  # differ between seeds / machines, not between setups


def find_runs(patterns) -> list[str]:
  """Work dirs with an eval.json, sorted: each pattern a dir, a glob, or a dir of work dirs."""
  dirs = set()
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) or [pattern]
    found = set()
    for m in matches:
      m = os.path.normpath(m)  # `a`, `a/` and `./a` are one run, not two seeds
      if os.path.isfile(os.path.join(m, "eval.json")):
        found.add(m)
      elif os.path.isdir(m):
        found.update(os.path.join(m, d) for d in os.listdir(m)
                     if os.path.isfile(os.path.join(m, d, "eval.json")))
    if not found:  # a mistyped or unevaluated dir must not vanish from the table
      raise ValueError(f"no eval.json found under {pattern}: pass work dirs evaluated "
                       "with bipe-eval, globs of them, or a sweep root")
    dirs |= found
  return sorted(dirs)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


_REDO = "run bipe-eval on its work dir again, or leave the dir out"
# What compare reads: per result list, the keys of each row and of the file itself.
_RESULT_KEYS = {"results": (("length", "ppl"), ()),
                "arithmetic": (("n", "answer_acc", "chain_acc"), ("train_max_ops",))}


def _read_object(path: str) -> dict:
  """The JSON object in `path`, or a ValueError naming the file."""
  value = pyconfig.read_json(path, _REDO)
  if not isinstance(value, dict):
    raise ValueError(f"{path} is damaged (not a JSON object): {_REDO}")
  return value


def _check_result(result: dict, path: str) -> None:
  """A ValueError naming `path` unless it holds sound perplexity or arithmetic results."""
  if not any(k in result for k in _RESULT_KEYS):
    raise ValueError(f"{path} holds neither perplexity results nor arithmetic accuracy: {_REDO}")
  for key, (row_keys, file_keys) in _RESULT_KEYS.items():
    rows = result.get(key)
    if rows is None:
      continue
    if not (isinstance(rows, list) and all(isinstance(r, dict) and set(row_keys) <= r.keys()
                                           for r in rows) and set(file_keys) <= result.keys()):
      raise ValueError(f"{path} is damaged ({key!r} needs {', '.join(row_keys + file_keys)}): "
                       f"{_REDO}")


def load_run(workdir: str) -> dict:
  """{dir, eval, config}: config is the flat config.json (or what eval.json tells)."""
  result = _read_object(os.path.join(workdir, "eval.json"))
  _check_result(result, os.path.join(workdir, "eval.json"))
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    config = _flat(_read_object(path))
  else:
    config = {"pe.kind": result.get("pe_kind", "?"), "data.seq_len": result.get("train_length")}
  config.update(_evaluated(result))
  return {"dir": workdir, "eval": result, "config": config}


def _evaluated(result: dict) -> dict:
  """What eval.json says about how the run was evaluated, as `evaluated.*` keys: runs
  evaluated at another step, with another context extension or on another corpus are
  another row, never averaged in as one more seed."""
  out = {}
  if "step" in result:
    out["evaluated.step"] = result["step"]
  scaling = result.get("rope_scaling")
  if isinstance(scaling, dict):
    kind = scaling.get("kind", "none")
    out["evaluated.rope_scaling"] = kind if kind == "none" else f"{kind} x{scaling.get('factor')}"
  if result.get("source"):
    out["evaluated.source"] = result["source"]
  return out


def group_runs(runs: list[dict]) -> list[dict]:
  """Runs grouped by config minus IGNORED_KEYS: [{label, runs, seeds, train_length}]."""
  groups = {}
  for r in runs:
    key = tuple(sorted((k, repr(v)) for k, v in r["config"].items() if k not in IGNORED_KEYS))
    groups.setdefault(key, []).append(r)
  keys = list(groups)
  varying = sorted({k for key in keys for k, _ in key
                    if len({dict(kk).get(k) for kk in keys}) > 1})
  out = []
  for key in keys:
    members = groups[key]
    cfg = members[0]["config"]
    if varying == ["pe.kind"] or not varying:
      label = str(cfg.get("pe.kind", members[0]["eval"].get("pe_kind")))
    else:
      label = ", ".join(f"{k}={cfg.get(k)}" for k in varying)
    out.append({"label": label, "runs": members,
                "seeds": sorted(m["config"].get("seed", 0) for m in members),
                "train_length": members[0]["eval"].get("train_length")})
  return out


def _stats(values) -> tuple[float, float]:
  v = np.asarray(values, dtype=np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _cell(mean: float, sd: float, n: int, fmt: str) -> str:
  return f"{mean:{fmt}} ± {sd:{fmt}}" if n > 1 else f"{mean:{fmt}}"


def perplexity_table(groups: list[dict]) -> tuple[str, list[dict]]:
  """Markdown table and rows [{label, n, lengths: {L: (mean, sd)}}], sorted best first."""
  rows = []
  for g in groups:
    per = {}
    for m in g["runs"]:
      for r in m["eval"]["results"]:
        per.setdefault(int(r["length"]), []).append(r["ppl"])
    # Only lengths every seed has, so a mean never mixes different run sets.
    lengths = {L: _stats(v) for L, v in per.items() if len(v) == len(g["runs"])}
    rows.append({"label": g["label"], "n": len(g["runs"]), "lengths": lengths,
                 "train_length": g["train_length"]})
  common = set.intersection(*[set(r["lengths"]) for r in rows]) if rows else set()
  key_len = max(common) if common else None
  rows.sort(key=lambda r: (r["lengths"][key_len][0] if key_len else float("inf"), r["label"]))
  lengths = sorted({L for r in rows for L in r["lengths"]})
  train = {r["train_length"] for r in rows}
  head = [f"{L}" + (f" ({L / next(iter(train)):g}x)" if len(train) == 1 and None not in train else "")
          for L in lengths]
  lines = ["| run | seeds | " + " | ".join(head) + " |",
           "|---|---|" + "---|" * len(lengths)]
  for r in rows:
    cells = [_cell(*r["lengths"][L], r["n"], ".2f") if L in r["lengths"] else "" for L in lengths]
    lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
  note = (f"Perplexity, mean ± sample sd over seeds; sorted by the mean at {key_len} tokens."
          if key_len else "Perplexity.")
  return note + "\n\n" + "\n".join(lines), rows


def arithmetic_table(groups: list[dict]) -> tuple[str, list[dict]]:
  """Markdown tables (answer, chain accuracy by operators) and rows, best first."""
  rows = []
  for g in groups:
    per = {}
    for m in g["runs"]:
      for r in m["eval"]["arithmetic"]:
        per.setdefault(int(r["n"]), []).append((r["answer_acc"], r["chain_acc"]))
    stats = {n: (_stats([a for a, _ in v]), _stats([c for _, c in v]))
             for n, v in per.items() if len(v) == len(g["runs"])}
    train_max = g["runs"][0]["eval"]["train_max_ops"]
    longer = [stats[n][0][0] for n in stats if n > train_max]
    rows.append({"label": g["label"], "n": len(g["runs"]), "ops": stats, "train_max_ops": train_max,
                 "score": float(np.mean(longer)) if longer else float("nan")})
  rows.sort(key=lambda r: (-np.nan_to_num(r["score"], nan=-1.0), r["label"]))
  ns = sorted({n for r in rows for n in r["ops"]})
  out = []
  for which, title in ((0, "exact final answer"), (1, "exact whole chain")):
    lines = [f"Arithmetic, {title}: accuracy by number of operators (mean ± sample sd over "
             f"seeds; training had 1..{rows[0]['train_max_ops']}); sorted by mean answer "
             "accuracy on longer expressions.", "",
             "| run | seeds | " + " | ".join(str(n) for n in ns) + " |",
             "|---|---|" + "---|" * len(ns)]
    for r in rows:
      cells = [_cell(*[100 * x for x in r["ops"][n][which]], r["n"], ".0f") if n in r["ops"] else ""
               for n in ns]
      lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out), rows


def _axes():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt, *plt.subplots(figsize=(6, 4))


def plot_perplexity(rows: list[dict], path: str) -> None:
  plt, fig, ax = _axes()
  for r in rows:
    ls = sorted(r["lengths"])
    ax.errorbar(ls, [r["lengths"][L][0] for L in ls], yerr=[r["lengths"][L][1] for L in ls],
                marker="o", capsize=3, label=r["label"])
  for t in sorted({r["train_length"] for r in rows if r["train_length"]}):
    ax.axvline(t, color="gray", linestyle="--", linewidth=1, label=f"training length {t}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  lengths = sorted({L for r in rows for L in r["lengths"]})
  ax.set_xticks(lengths, [str(L) for L in lengths])
  # Plain numbers on the log axis: the range is often well under a decade.
  ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel("evaluation length (tokens)")
  ax.set_ylabel("perplexity")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_arithmetic(rows: list[dict], path: str) -> None:
  plt, fig, ax = _axes()
  for r in rows:
    ns = sorted(r["ops"])
    ax.errorbar(ns, [r["ops"][n][0][0] for n in ns], yerr=[r["ops"][n][0][1] for n in ns],
                marker="o", capsize=3, label=r["label"])
  ax.axvline(rows[0]["train_max_ops"] + 0.5, color="gray", linestyle="--", linewidth=1,
             label="longest in training")
  ax.set_xlabel("operators")
  ax.set_ylabel("exact final-answer accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare(patterns, out: str | None = None) -> str:
  """Writes <out>.md and the plots; returns the markdown."""
  dirs = find_runs(patterns)
  runs = [load_run(d) for d in dirs]
  out = out or os.path.join(os.path.commonpath([os.path.abspath(d) for d in dirs])
                            if len(dirs) > 1 else os.path.dirname(os.path.abspath(dirs[0])),
                            "compare")
  if out.endswith(("/", os.sep)) or os.path.isdir(out):  # a directory: compare.* in it
    out = os.path.join(out, "compare")
  elif out.endswith(".md"):  # the table's own name given: no x.md.md
    out = out[:-3]
  ppl = [r for r in runs if "results" in r["eval"]]
  arith = [r for r in runs if "arithmetic" in r["eval"]]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # before the plots
  parts = []
  if ppl:
    text, rows = perplexity_table(group_runs(ppl))
    plot_perplexity(rows, out + ".png")
    parts.append(text + f"\n\nPlot: {out}.png")
  if arith:
    text, rows = arithmetic_table(group_runs(arith))
    plot_arithmetic(rows, out + "_arithmetic.png")
    parts.append(text + f"\n\nPlot: {out}_arithmetic.png")
  md = "\n\n".join(parts) + "\n\nRuns: " + " ".join(dirs) + "\n"
  with open(out + ".md", "w") as f:
    f.write(md)
  return md


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("dirs", nargs="+", help="work dirs, globs of them, or sweep roots")
  parser.add_argument("--out", help="output prefix for .md and .png, or a directory to write compare.md and compare.png in (default: <common parent>/compare)")
  args = parser.parse_args(argv)
  try:
    print(compare(args.dirs, args.out))
  except (ValueError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def run() -> None:
  """Console entry point `bipe-compare`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
