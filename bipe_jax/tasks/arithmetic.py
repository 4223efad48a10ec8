"""Arithmetic modulo a prime with a chain of thought (`data.source = "arithmetic"`).

A document is a question line and one line per reduction step, e.g. modulo 7:

    3*(4+5)-2
    =3*2-2
    =6-2
    =4

An expression with n operators (+ - * /, `/` multiplying by the modular
inverse, never by zero) takes n steps; each step reduces the leftmost operation
whose operands are both numbers and rewrites the whole expression with the
fewest parentheses that keep its tree (`*` `/` bind tighter, left to right; a
right operand of equal precedence keeps its parentheses). Every line ends in a
newline, so with `segmentation.modality = "cot"` each step is one segment.

Splits: an expression is test-only when a hash of its text falls below
`arithmetic.test_fraction`, so training and test sets are disjoint by
construction for every n, and the test set does not depend on the data seed.
Training draws n uniformly from 1..train_max_ops; accuracy is reported for
n = 1..test_max_ops by greedy generation from the question line.
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np

from bipe_jax.data import sources

OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ANSWER = re.compile(r"^=(\d+)$")


# Expressions: an int leaf or a tuple (op, left, right) -------------------------

def is_prime(p: int) -> bool:
  return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def value(node, p: int) -> int:
  """Value of an expression tree modulo p (ValueError on division by zero)."""
  if isinstance(node, int):
    return node
  op, a, b = node[0], value(node[1], p), value(node[2], p)
  if op == "+":
    return (a + b) % p
  if op == "-":
    return (a - b) % p
  if op == "*":
    return (a * b) % p
  if b == 0:
    raise ValueError("division by zero")
  return (a * pow(b, p - 2, p)) % p  # Fermat: b^(p-2) is b's inverse mod p.


def text(node) -> str:
  """Infix text with the fewest parentheses that keep the tree."""
  if isinstance(node, int):
    return str(node)
  op, left, right = node
  ls, rs = text(left), text(right)
  if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
    ls = f"({ls})"
  if not isinstance(right, int) and _PREC[right[0]] <= _PREC[op]:
    rs = f"({rs})"
  return f"{ls}{op}{rs}"


def reduce_once(node, p: int):
  """The tree with its leftmost operation on two numbers replaced by its value."""
  op, left, right = node
  if isinstance(left, int) and isinstance(right, int):
    return value(node, p)
  if not isinstance(left, int):
    return (op, reduce_once(left, p), right)
  return (op, left, reduce_once(right, p))


def chain(node, p: int) -> list[str]:
  """Texts of the steps after the question: n of them, the last one the answer."""
  steps = []
  while not isinstance(node, int):
    node = reduce_once(node, p)
    steps.append(text(node))
  return steps


def document(node, p: int) -> str:
  return text(node) + "\n" + "".join(f"={s}\n" for s in chain(node, p))


def random_expression(rng: np.random.Generator, n_ops: int, p: int):
  """A uniformly shaped random tree with n_ops operators and no division by zero."""
  def build(n):
    if n == 0:
      return int(rng.integers(p))
    k = int(rng.integers(n))  # operators in the left subtree
    return (OPS[int(rng.integers(4))], build(k), build(n - 1 - k))
  while True:
    node = build(n_ops)
    try:
      value(node, p)
      return node
    except ValueError:
      continue


def is_test(expression: str, config) -> bool:
  a = config.arithmetic
  return sources.stable_fraction(f"arithmetic:{a.modulus}:{expression}") < a.test_fraction


# Data sets ----------------------------------------------------------------------

def check(config) -> None:
  a = config.arithmetic
  if not is_prime(int(a.modulus)):
    raise ValueError(f"arithmetic.modulus={a.modulus} must be a prime (e.g. 7 or 11)")
  if not 1 <= a.train_max_ops <= a.test_max_ops:
    raise ValueError(f"need 1 <= arithmetic.train_max_ops ({a.train_max_ops}) <= "
                     f"arithmetic.test_max_ops ({a.test_max_ops})")
  if not 0.0 < a.test_fraction < 1.0:
    raise ValueError(f"arithmetic.test_fraction={a.test_fraction} must be in (0, 1)")
  if a.train_examples < 1 or a.test_examples < 1:
    raise ValueError("arithmetic.train_examples and arithmetic.test_examples must be >= 1")


def train_documents(config) -> list[str]:
  """`arithmetic.train_examples` documents, n uniform in 1..train_max_ops (seeded)."""
  check(config)
  a = config.arithmetic
  rng = np.random.default_rng([int(a.seed), 0])
  docs = []
  while len(docs) < a.train_examples:
    node = random_expression(rng, int(rng.integers(1, a.train_max_ops + 1)), a.modulus)
    if not is_test(text(node), config):
      docs.append(document(node, a.modulus))
  return docs


def test_examples(config) -> dict[int, list[tuple[str, list[str]]]]:
  """{n: [(question, steps)]}: distinct test-only expressions, n = 1..test_max_ops.

  Up to `arithmetic.test_examples` per n; fewer where the test share of all
  n-operator expressions is smaller (n = 1 modulo 7 has about 19).
  """
  check(config)
  a = config.arithmetic
  out = {}
  for n in range(1, a.test_max_ops + 1):
    rng = np.random.default_rng([1_000_003, n])  # independent of the data seed
    seen = {}
    for _ in range(200 * a.test_examples):
      node = random_expression(rng, n, a.modulus)
      q = text(node)
      if q not in seen and is_test(q, config):
        seen[q] = chain(node, a.modulus)
        if len(seen) == a.test_examples:
          break
    out[n] = sorted(seen.items())
  return out


def write_train_file(config, cache_dir: str) -> str:
  """Writes the training documents as <cache_dir>/arithmetic-<hash>.jsonl; returns its path."""
  docs = train_documents(config)
  body = "".join(json.dumps({"text": d}) + "\n" for d in docs)
  key = sources.stable_fraction(json.dumps(config.arithmetic.to_dict(), sort_keys=True))
  path = os.path.join(cache_dir, f"arithmetic-{int(key * 1e12):012d}.jsonl")
  return sources.write_if_changed(path, body)


# Scoring ------------------------------------------------------------------------

def score(generated: str, steps: list[str]) -> tuple[bool, bool]:
  """(answer correct, whole chain correct) of generated text after the question line.

  The chain is read up to its first line that is a bare number ("=4").
  """
  lines = []
  for line in generated.split("\n"):
    lines.append(line)
    if _ANSWER.match(line):
      break
  else:
    return False, False
  truth = [f"={s}" for s in steps]
  return lines[-1] == truth[-1], lines == truth


def accuracy(generator, params, tokenizer, config, log=print) -> list[dict]:
  """[{n, examples, answer_acc, chain_acc, seconds}] by greedy generation, n = 1..test_max_ops.

  generator: a bipe_jax.decode.Generator for the model (cached decoding).
  """
  rows = []
  for n, examples in test_examples(config).items():
    t0 = time.time()
    prompts = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(q + "\n")])
               for q, _ in examples]
    want = max(len(tokenizer.encode("".join(f"={s}\n" for s in steps)))
               for _, steps in examples)
    # Room for a chain somewhat longer than the true one (a wrong but complete answer).
    outs = generator(params, prompts, want + want // 2 + 4).tokens
    marks = [score(tokenizer.decode(o), steps) for o, (_, steps) in zip(outs, examples)]
    rows.append(dict(n=n, examples=len(examples),
                     answer_acc=float(np.mean([m[0] for m in marks])),
                     chain_acc=float(np.mean([m[1] for m in marks])),
                     seconds=time.time() - t0))
    log(f"  {n:>2} operators: answer {rows[-1]['answer_acc']:6.1%}  chain "
        f"{rows[-1]['chain_acc']:6.1%}  ({len(examples)} expressions, {rows[-1]['seconds']:.1f}s)")
  return rows


def format_table(rows: list[dict], train_max_ops: int) -> str:
  lines = [f"{'operators':>9} {'answer':>8} {'chain':>8} {'examples':>9}"]
  for r in rows:
    mark = "" if r["n"] <= train_max_ops else "  (longer than training)"
    lines.append(f"{r['n']:>9} {r['answer_acc']:>8.1%} {r['chain_acc']:>8.1%} "
                 f"{r['examples']:>9}{mark}")
  return "\n".join(lines)


def plot(rows: list[dict], train_max_ops: int, label: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ns = [r["n"] for r in rows]
  ax.plot(ns, [r["answer_acc"] for r in rows], marker="o", label=f"{label} answer")
  ax.plot(ns, [r["chain_acc"] for r in rows], marker="s", linestyle="--", label=f"{label} chain")
  ax.axvline(train_max_ops + 0.5, color="gray", linestyle=":", label="longest in training")
  ax.set_xlabel("operators")
  ax.set_ylabel("exact-match accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate_run(trainer, params, config, corpus, workdir: str, step: int) -> dict:
  """bipe-eval on an arithmetic run: accuracy by n into <workdir>/eval.json and eval.png."""
  import jax  # pylint: disable=g-import-not-at-top
  from bipe_jax import decode  # pylint: disable=g-import-not-at-top
  a = config.arithmetic
  print(f"arithmetic accuracy of step {step} of {workdir} (pe.kind={config.pe.kind}, "
        f"trained on 1..{a.train_max_ops} operators, modulo {a.modulus})", flush=True)
  generator = decode.Generator.for_trainer(trainer, corpus.tokenizer, corpus.separators)
  rows = accuracy(generator, params, corpus.tokenizer, config)
  result = dict(workdir=os.path.abspath(workdir), step=step, pe_kind=config.pe.kind,
                task="arithmetic", train_length=config.data.seq_len,
                train_max_ops=int(a.train_max_ops), modulus=int(a.modulus), arithmetic=rows)
  print(format_table(rows, a.train_max_ops))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
    plot(rows, a.train_max_ops, config.pe.kind, os.path.join(workdir, "eval.png"))
    print(f"wrote {os.path.join(workdir, 'eval.json')} and {os.path.join(workdir, 'eval.png')}")
  return result
