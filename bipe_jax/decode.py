"""Cached decoding for every encoding kind: prefill a prompt, then one token at a time.

    gen = Generator(model, position_rule(config, tokenizer, corpus.separators))
    out = gen(params, prompts, max_new=64, sampling=Sampling(temperature=0.8, top_p=0.9))

Prompts of different lengths share a batch by LEFT padding: row b's prompt of
n_b tokens fills slots [P - n_b, P) of the cache, P the longest prompt (rounded
up). Padding gets document id kv_cache.PAD_DOC, so no real token attends to it,
and position ids restart at each row's first real token, so a row's logits do
not depend on the padding in front of it. Every row then writes its next token
at the same slot, one shared cache index.

Position ids are produced on device, token by token, by `positions.step_ids`:
the rule of `positions.BilevelState` (intra/inter of the next token; a
separator ends its segment) plus the pipeline's document restarts (a BOS token
starts a new document when `data.packing` is not "windows"), vectorised over
the batch. Tests check it against `positions.bilevel_ids` on whole rows.

The model is called through its ordinary path (`Decoder(batch, cache=...)`):
the prompt goes through the training attention kernels, the encoding rotates
each new query and key by its own position (rotary kinds cache rotated keys)
and biases are evaluated against the cached key positions (bias kinds). The
loop is a jitted `lax.while_loop` of up to `chunk` tokens per call, so the
caller can print text between calls (streaming) at no cost per token.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bipe_jax import sharding
from bipe_jax.data import pipeline
from bipe_jax.kv_cache import PAD_DOC, KVCache
from bipe_jax.positions import IdState, PositionRule, row_ids, step_ids

PROMPT_MULTIPLE = 16   # prompt slots round up to this, so few shapes compile
CACHE_MULTIPLE = 64


# Sampling -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (argmax). Else softmax(logits / temperature) restricted
  to the top_k most likely tokens (0: all) and to the smallest set whose
  probability reaches top_p (1: all)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not 0 <= self.temperature < float("inf"):
      raise ValueError(f"temperature={self.temperature} must be finite and >= 0 (0: greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0: no limit)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample(logits_BV, key, s: Sampling):
  """[B] int32 tokens drawn from float32 logits [B, V]."""
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / s.temperature
  if s.top_k and s.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if s.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the mass before it is below top_p (the first always).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B = jnp.sum(before_BV < s.top_p, axis=-1)
    cut_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cut_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# The loop -----------------------------------------------------------------------

@flax.struct.dataclass
class Carry:
  """Everything the decode loop carries between tokens and between calls."""
  cache: KVCache
  ids: IdState
  logits_BV: jnp.ndarray     # next-token logits
  done_B: jnp.ndarray        # row has produced a stop token
  out_BN: jnp.ndarray        # generated tokens (pad after a stop)
  n: jnp.ndarray             # tokens generated so far (all rows alike)
  kept_BNV: jnp.ndarray | None = None   # logits each token was drawn from


@dataclasses.dataclass
class Output:
  """tokens: per prompt, the generated ids (up to, not including, a stop token);
  stopped: whether each row met a stop token; prefill_logits [B, P, V] and
  logits [B, N, V] (with keep_logits; rows left-padded to P); timings in
  seconds; cache: the KV cache after the last token."""
  tokens: list
  stopped: np.ndarray
  prefill_tokens: int
  decode_tokens: int
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float   # about 0 when an earlier call compiled these shapes
  cache: KVCache
  prefill_logits: np.ndarray | None = None
  logits: np.ndarray | None = None


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def position_rule(config, tokenizer, separators) -> PositionRule:
  """The id rule of a run: its separators (a bool [V] table or the corpus's
  LevelSeparators), clip bounds and document restarts, as its pipeline had them."""
  return PositionRule(separators, pipeline.level_bounds(config), int(tokenizer.bos_id),
                      config.data.packing != "windows")


class Generator:
  """Cached decoding with a bipe_jax.model.Decoder.

  mesh: run on this mesh (batch over its data axes, heads over `tensor`;
  params should already lie there); `rules`: config.mesh.rules for the
  cache's layout (sharding.rules(config)).
  """

  def __init__(self, model, rule: PositionRule, mesh=None, rules=None, pad_id: int = 0):
    self.model, self.rule, self.mesh, self.rules = model, rule, mesh, rules
    self.pad_id = int(pad_id)
    # Rows are padded to a multiple of the data-parallel size, so they split evenly.
    self.dp = 1 if mesh is None or rules is None else sharding.data_parallel_size(
        dict(mesh.shape), rules)
    self.tables = jax.tree.map(jnp.asarray, rule.tables())
    self._cache = {}
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("max_len", "max_new", "keep"))
    self._decode = jax.jit(self._decode_fn, donate_argnums=1,
                           static_argnames=("sampling", "stop", "chunk"))

  @classmethod
  def for_trainer(cls, trainer, tokenizer, separators) -> "Generator":
    """A Generator for a bipe_jax.trainer.Trainer's model, on its mesh;
    `separators` as the run's pipeline had them (Corpus.separators)."""
    return cls(trainer.model, position_rule(trainer.config, tokenizer, separators),
               trainer.mesh, trainer.rules, tokenizer.pad_id)

  # Jitted pieces ----------------------------------------------------------------

  def _constrain(self, tree, axes):
    """`tree` laid out by logical `axes` (a matching tree of PartitionSpecs) on the mesh:
    the loop's carry has one layout in and out of every call."""
    if self.mesh is None or self.rules is None:
      return tree
    shardings = sharding.logical_shardings(axes, tree, self.mesh, self.rules)
    return jax.lax.with_sharding_constraint(tree, shardings)

  def _constrain_carry(self, c: Carry) -> Carry:
    rows, rows2, rows3 = P("batch"), P("batch", None), P("batch", None, None)
    axes = Carry(cache=c.cache.logical_axes(), ids=jax.tree.map(lambda _: rows, c.ids),
                 logits_BV=rows2, done_B=rows, out_BN=rows2, n=P(),
                 kept_BNV=None if c.kept_BNV is None else rows3)
    return self._constrain(c, axes)

  def _prefill_fn(self, params, tokens_BP, valid_BP, tables, live_B, max_len: int,
                  max_new: int, keep: bool):
    """live_B: False for rows that only pad the batch to the data-parallel size."""
    b = tokens_BP.shape[0]
    ids, state = row_ids(IdState.start(b, self.rule.levels), tokens_BP, valid_BP, tables,
                         self.rule, PAD_DOC)
    cache = KVCache.zeros(self.model.cfg, b, max_len)
    cache = self._constrain(cache, cache.logical_axes())
    logits_BPV, cache = self.model.apply({"params": params}, dict(tokens=tokens_BP, **ids),
                                         cache=cache, last_only=not keep)
    v = logits_BPV.shape[-1]
    carry = Carry(cache=cache, ids=state, logits_BV=logits_BPV[:, -1],
                  done_B=~live_B,
                  out_BN=jnp.full((b, max_new), self.pad_id, jnp.int32),
                  n=jnp.zeros((), jnp.int32),
                  kept_BNV=jnp.zeros((b, max_new, v), jnp.float32) if keep else None)
    return self._constrain_carry(carry), logits_BPV if keep else None

  def _decode_fn(self, params, carry: Carry, key, limit, forced_BN, sampling: Sampling,
                 stop: tuple, chunk: int):
    """Up to `chunk` more tokens, while n < limit and some row runs on."""
    stop_S = jnp.asarray(stop if stop else (-1,), jnp.int32)
    end = jnp.minimum(carry.n + chunk, limit)

    def cond(c: Carry):
      return (c.n < end) & ~jnp.all(c.done_B)

    def body(c: Carry):
      tok_B = sample(c.logits_BV, jax.random.fold_in(key, c.n), sampling)
      if forced_BN is not None:
        tok_B = forced_BN[:, c.n]
      tok_B = jnp.where(c.done_B, self.pad_id, tok_B)
      kept = None
      if c.kept_BNV is not None:
        kept = jax.lax.dynamic_update_index_in_dim(c.kept_BNV, c.logits_BV, c.n, 1)
      ids, state = step_ids(c.ids, tok_B, ~c.done_B, tables, self.rule, PAD_DOC)
      batch = {k: v[..., None] for k, v in dict(tokens=tok_B, **ids).items()}
      logits_B1V, cache = self.model.apply({"params": params}, batch, cache=c.cache)
      return Carry(cache=cache, ids=state, logits_BV=logits_B1V[:, 0],
                   done_B=c.done_B | jnp.isin(tok_B, stop_S),
                   out_BN=jax.lax.dynamic_update_index_in_dim(c.out_BN, tok_B, c.n, 1),
                   n=c.n + 1, kept_BNV=kept)

    tables = self.tables
    return self._constrain_carry(jax.lax.while_loop(cond, body, carry))

  def _compiled(self, args, forced, key, prefill_kw: dict, decode_kw: dict):
    """(prefill, decode) executables for these shapes and settings, compiled once."""
    params = args[0]
    sig = (tuple((x.shape, str(getattr(x, "sharding", ""))) for x in jax.tree.leaves(params)),
           args[1].shape, None if forced is None else forced.shape,
           tuple(sorted(prefill_kw.items())), tuple(sorted(decode_kw.items())))
    if sig not in self._cache:
      lowered = self._prefill.lower(*args, **prefill_kw)
      carry = lowered.out_info[0]
      decode = self._decode.lower(params, carry, key, jnp.int32(0), forced, **decode_kw)
      self._cache[sig] = (lowered.compile(), decode.compile())
    return self._cache[sig]

  # Host side --------------------------------------------------------------------

  def layout(self, prompts: Sequence, max_new: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [B, P], valid [B, P], cache slots): prompts left-padded to P."""
    if not len(prompts) or min(len(p) for p in prompts) < 1:
      raise ValueError("every prompt needs at least one token")
    p = _round_up(max(len(x) for x in prompts), PROMPT_MULTIPLE)
    tokens = np.full((len(prompts), p), self.pad_id, np.int32)
    valid = np.zeros((len(prompts), p), bool)
    for i, x in enumerate(prompts):
      tokens[i, p - len(x):] = np.asarray(x, np.int32)
      valid[i, p - len(x):] = True
    return tokens, valid, _round_up(p + max_new, CACHE_MULTIPLE)

  def __call__(self, params, prompts: Sequence, max_new: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_tokens: Sequence[int] = (), chunk: int = 0,
               on_tokens: Callable | None = None, forced=None,
               keep_logits: bool = False) -> Output:
    """Continues each prompt (a sequence of token ids) by up to `max_new` tokens.

    chunk: tokens per jitted call (0: all in one); on_tokens(new_BN) is called
    after each call with the [B, n] tokens it produced (streaming).
    forced: optional [B, max_new] ids placed instead of sampled ones (scoring
    a given continuation). keep_logits: also return every logit (tests).
    """
    if max_new < 1:
      raise ValueError(f"max_new={max_new} must be >= 1")
    n_rows = len(prompts)
    prompts = list(prompts) + [[self.pad_id]] * (-n_rows % self.dp)
    if forced is not None and len(forced) < len(prompts):
      forced = np.concatenate([forced, np.zeros((len(prompts) - n_rows, max_new), int)])
    tokens, valid, max_len = self.layout(prompts, max_new)
    chunk = chunk or max_new
    key = jax.random.key(seed)
    forced = None if forced is None else jnp.asarray(np.asarray(forced, np.int32))
    stop = tuple(sorted({int(t) for t in stop_tokens}))
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      t0 = time.perf_counter()
      live = np.arange(len(prompts)) < n_rows
      args = (params, tokens, valid, self.tables, live)
      prefill, decode = self._compiled(args, forced, key, dict(
          max_len=max_len, max_new=max_new, keep=keep_logits), dict(
              sampling=sampling, stop=stop, chunk=chunk))
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      carry, prefill_logits = prefill(*args)
      jax.block_until_ready(carry)
      prefill_s = time.perf_counter() - t0
      t0, n = time.perf_counter(), 0
      while n < max_new:
        carry = decode(params, carry, key, jnp.int32(max_new), forced)
        new_n = int(carry.n)
        if on_tokens is not None and new_n > n:
          on_tokens(np.asarray(carry.out_BN[:n_rows, n:new_n]))
        if new_n == n or new_n >= max_new or bool(np.all(carry.done_B)):
          break
        n = new_n
      out = np.asarray(carry.out_BN)
      decode_s = time.perf_counter() - t0
    n = int(carry.n)
    done = np.asarray(carry.done_B)[:n_rows]
    rows = []
    for row in out[:n_rows, :n]:
      hits = np.flatnonzero(np.isin(row, stop)) if stop else []
      rows.append(row[:hits[0]] if len(hits) else row)
    return Output(tokens=rows, stopped=done, prefill_tokens=int(valid[:n_rows].sum()),
                  decode_tokens=n * n_rows, prefill_seconds=prefill_s,
                  decode_seconds=decode_s, compile_seconds=compile_s,
                  cache=carry.cache,
                  prefill_logits=np.asarray(prefill_logits)[:n_rows] if keep_logits else None,
                  logits=np.asarray(carry.kept_BNV)[:n_rows, :n] if keep_logits else None)

