"""Arithmetic chain of thought: answers and steps against Python's own parser; generation loop."""
import ast
import json
import os

import jax
import numpy as np
import pytest

from bipe_jax import decode, positions
from bipe_jax.data import pipeline, sources
from bipe_jax.data.tokenizer import train_tokenizer
from bipe_jax.model import Decoder, ModelConfig
from bipe_jax.tasks import arithmetic as A
from configs import arithmetic_bipe_rope


def _config(**arith):
  c = arithmetic_bipe_rope.get_config()
  for k, v in arith.items():
    setattr(c.arithmetic, k, v)
  return c


# An independent oracle: Python's parser (same precedence and associativity as
# the task's notation) and modular arithmetic written out here.
def _ast(expression: str):
  return ast.parse(expression, mode="eval").body


def _eval(node, p):
  if isinstance(node, ast.Constant):
    return node.value
  a, b = _eval(node.left, p), _eval(node.right, p)
  if isinstance(node.op, ast.Add):
    return (a + b) % p
  if isinstance(node.op, ast.Sub):
    return (a - b) % p
  if isinstance(node.op, ast.Mult):
    return (a * b) % p
  assert isinstance(node.op, ast.Div) and b % p, "division by zero in a generated expression"
  return next(x for x in range(p) if (x * b) % p == a)


def _ops(node):
  return 0 if isinstance(node, ast.Constant) else 1 + _ops(node.left) + _ops(node.right)


def _one_step_diffs(before, after, p):
  """Number of places where `after` replaces an operation on two numbers of `before`
  by its value; None if the trees differ in any other way."""
  if isinstance(before, ast.Constant):
    return 0 if isinstance(after, ast.Constant) and after.value == before.value else None
  if isinstance(after, ast.Constant):
    ready = isinstance(before.left, ast.Constant) and isinstance(before.right, ast.Constant)
    return 1 if ready and after.value == _eval(before, p) else None
  if type(before.op) is not type(after.op):
    return None
  left, right = _one_step_diffs(before.left, after.left, p), _one_step_diffs(before.right, after.right, p)
  return None if left is None or right is None else left + right


@pytest.mark.parametrize("p", [7, 11])
def test_answers_and_steps_against_python_parser(p):
  rng = np.random.default_rng(p)
  for n in list(range(1, 10)) * 12:
    node = A.random_expression(rng, n, p)
    question, steps = A.text(node), A.chain(node, p)
    tree = _ast(question)
    assert _ops(tree) == n and len(steps) == n, question
    assert int(steps[-1]) == _eval(tree, p), f"{question}: answer {steps[-1]}"
    prev = tree
    for s in steps:
      cur = _ast(s)
      assert _one_step_diffs(prev, cur, p) == 1, f"{ast.unparse(prev)} -> {s} is not one reduction"
      assert _eval(cur, p) == _eval(tree, p)
      prev = cur
    doc = A.document(node, p)
    assert doc == question + "\n" + "".join(f"={s}\n" for s in steps)


def test_one_step_check_rejects_wrong_rewrites():
  # The checker above must catch a skipped step, a wrong value and a changed operator.
  p = 7
  assert _one_step_diffs(_ast("1+2*3"), _ast("1+6"), p) == 1
  assert _one_step_diffs(_ast("1+2*3"), _ast("0"), p) is None      # two reductions at once
  assert _one_step_diffs(_ast("1+2*3"), _ast("1+5"), p) is None    # wrong value
  assert _one_step_diffs(_ast("1+2*3"), _ast("1-6"), p) is None    # operator changed
  assert _one_step_diffs(_ast("(1+2)*(3+4)"), _ast("3*0"), p) == 2  # two at once: not 1


def test_parentheses_keep_the_tree():
  assert A.text(("-", 5, ("-", 3, 1))) == "5-(3-1)"
  assert A.text(("+", 5, ("+", 3, 1))) == "5+(3+1)"
  assert A.text(("-", ("-", 5, 3), 1)) == "5-3-1"
  assert A.text(("*", ("+", 1, 2), 3)) == "(1+2)*3"
  assert A.text(("+", 1, ("*", 2, 3))) == "1+2*3"
  assert A.chain(("*", ("+", 1, 2), ("+", 3, 4)), 7) == ["3*(3+4)", "3*0", "0"]
  assert A.value(("/", 3, 5), 7) == 2  # 5 * 2 = 10 = 3 mod 7


def test_datasets_deterministic_disjoint_and_in_range():
  c = _config(train_examples=400, test_examples=20, train_max_ops=3, test_max_ops=5)
  train = A.train_documents(c)
  assert train == A.train_documents(c), "same seed, same documents"
  other = _config(train_examples=400, test_examples=20, train_max_ops=3, test_max_ops=5, seed=1)
  assert A.train_documents(other) != train
  questions = {d.split("\n")[0] for d in train}
  assert {_ops(_ast(q)) for q in questions} == {1, 2, 3}
  test = A.test_examples(c)
  assert test == A.test_examples(other), "the test set does not depend on the data seed"
  assert sorted(test) == [1, 2, 3, 4, 5]
  for n, examples in test.items():
    qs = [q for q, _ in examples]
    assert len(set(qs)) == len(qs) and all(_ops(_ast(q)) == n for q in qs)
    assert not set(qs) & questions, f"test expressions with {n} operators appear in training"
    assert len(qs) == 20 or n == 1
  # Every test-only one-operator expression (there are about 22 modulo 7) is found.
  ones = {f"{a}{op}{b}" for a in range(7) for b in range(7) for op in "+-*/" if op != "/" or b}
  assert sorted(q for q, _ in A.test_examples(_config(test_examples=500, train_max_ops=1, test_max_ops=1))[1]) == \
      sorted(q for q in ones if A.is_test(q, c))


def test_bad_settings_fail_by_name():
  with pytest.raises(ValueError, match="modulus"):
    A.check(_config(modulus=8))
  with pytest.raises(ValueError, match="train_max_ops"):
    A.check(_config(train_max_ops=5, test_max_ops=4))


def test_score():
  steps = ["3*2-2", "6-2", "4"]
  assert A.score("=3*2-2\n=6-2\n=4\n=5\n", steps) == (True, True)
  assert A.score("=3*2-2\n=5-2\n=4\n", steps) == (True, False)
  assert A.score("=3*2-2\n=6-2\n=3\n", steps) == (False, False)
  assert A.score("=3*2-2\n=6-2\n=4", steps) == (True, True)
  assert A.score("=3*2-2\n=6-2", steps) == (False, False)  # never reached an answer


def test_each_step_is_one_segment(tmp_path):
  c = _config(train_examples=300)
  docs = A.train_documents(c)
  tok = train_tokenizer(docs, str(tmp_path / "tok"), vocab_size=300)
  table = tok.separator_table("cot", c.segmentation.cot_delimiter)
  for doc in docs[:50]:
    ids = tok.encode(doc)
    _, inter = positions.bilevel_ids(ids, table)
    segments = [tok.decode(ids[inter == k]) for k in range(inter.max() + 1)]
    assert segments == [line + "\n" for line in doc.split("\n")[:-1]], doc
    question = doc.split("\n")[0] + "\n"
    assert list(tok.encode(question)) == list(ids[:len(tok.encode(question))])


def test_greedy_matches_token_by_token_argmax():
  cfg = ModelConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                    pe_kind="bipe_rope", max_intra=16, max_positions=64)
  model = Decoder(cfg)
  table = np.zeros(23, bool)
  table[[3, 7]] = True
  z = np.zeros((1, 8), np.int32)
  params = model.init(jax.random.key(1), dict(tokens=z, intra=z, inter=z, positions=z,
                                              doc_ids=z))["params"]
  prompts = [np.array([1, 5, 3, 9]), np.array([1, 7, 2, 2, 4, 8, 3])]
  max_new = 37
  rule = positions.PositionRule(table, cfg.max_intra, 1, restart_docs=False)
  got = decode.Generator(model, rule)(params, prompts, max_new, chunk=16).tokens
  # Reference: one row at a time, one forward per token on a fixed-width buffer
  # (one compilation; the causal model ignores what lies after the last token).
  width = 7 + max_new
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
  for prompt, out in zip(prompts, got):
    seq = list(prompt)
    for _ in range(max_new):
      tokens = np.zeros((1, width), np.int32)
      tokens[0, :len(seq)] = seq
      intra, inter = positions.bilevel_ids(tokens, table, cfg.max_intra)
      logits = forward(params, dict(tokens=tokens, intra=intra, inter=inter,
                                    positions=np.arange(width)[None], doc_ids=np.zeros_like(tokens)))
      seq.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
    np.testing.assert_array_equal(out, seq[len(prompt):])


def _documents(corpus) -> list[str]:
  """Decoded text of every document of both splits (BOS offsets from the corpus)."""
  out = []
  for tokens, starts in ((corpus.train_tokens, corpus.train_doc_starts),
                         (corpus.heldout_tokens, corpus.heldout_doc_starts)):
    bounds = list(starts) + [len(tokens)]
    out += [corpus.tokenizer.decode(tokens[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
  return out


def test_arithmetic_source_through_pipeline(tmp_path):
  c = _config(train_examples=200)
  c.tokenizer.vocab_size = 300
  corpus = pipeline.prepare(c, str(tmp_path))
  path = sources.list_files("arithmetic", c, str(tmp_path / "data"))[0]
  docs = [json.loads(l)["text"] for l in open(path)]
  assert docs == A.train_documents(c)
  mtime = os.stat(path).st_mtime_ns
  pipeline.prepare(c, str(tmp_path))  # same settings: file untouched, cache reused
  assert os.stat(path).st_mtime_ns == mtime
  assert sorted(_documents(corpus)) == sorted(docs)


def test_pydoc_topics_source(tmp_path):
  from pydoc_data.topics import topics
  c = arithmetic_bipe_rope.get_config()
  c.data.source, c.data.packing, c.segmentation.modality = "pydoc_topics", "windows", "text"
  c.data.max_documents = 6
  c.tokenizer.vocab_size = 400
  corpus = pipeline.prepare(c, str(tmp_path))
  first = sorted(topics)[:6]
  assert sorted(_documents(corpus)) == sorted(topics[k] for k in first)


def test_bipe_eval_on_an_arithmetic_run(tmp_path):
  from bipe_jax import evaluate, train
  c = _config(train_examples=300, train_max_ops=1, test_max_ops=2, test_examples=3)
  c.tokenizer.vocab_size = 300
  c.model.d_model, c.model.n_layers, c.model.d_ff = 32, 1, 64
  c.train.batch_size, c.train.steps, c.train.checkpoint_every = 4, 2, 2
  train.train(c, str(tmp_path))
  result = evaluate.evaluate(str(tmp_path))
  assert json.load(open(tmp_path / "eval.json")) == json.loads(json.dumps(result))
  assert [(r["n"], r["examples"]) for r in result["arithmetic"]] == [(1, 3), (2, 3)]
  assert result["train_max_ops"] == 1 and result["step"] == 2
  assert all(0 <= r["chain_acc"] <= r["answer_acc"] <= 1 for r in result["arithmetic"])
  assert (tmp_path / "eval.png").is_file()
