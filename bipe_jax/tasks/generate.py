"""Greedy generation with a full forward pass per token, in one jitted loop.

Each row of a [B, T] buffer holds its prompt from position 0; row b writes its
next token at its own cursor, so prompts of different lengths share a batch
without padding in front (positions stay those of training). Positions are
recomputed from the buffer at every step by the same rule as
`bipe_jax.positions.bilevel_ids` (one document per row); tokens after a row's
cursor are never attended to by the causal model, so their value is irrelevant.
The loop runs in chunks of CHUNK tokens, each on the shortest multiple of CHUNK
columns that holds it, so early tokens do not pay for the whole buffer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 32


def bilevel_ids_jnp(tokens_BT, is_separator_V, max_intra: int | None):
  """(intra, inter) int32 [B, T] of single-document rows, as positions.bilevel_ids."""
  sep_BT = is_separator_V[tokens_BT]
  idx_T = jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)
  starts_BT = jnp.concatenate([jnp.ones_like(sep_BT[:, :1]), sep_BT[:, :-1]], axis=1)
  seg_start_BT = jax.lax.cummax(jnp.where(starts_BT, idx_T, 0), axis=1)
  intra_BT = idx_T - seg_start_BT
  if max_intra is not None:
    intra_BT = jnp.minimum(intra_BT, max_intra - 1)
  inter_BT = jnp.cumsum(sep_BT, axis=1, dtype=jnp.int32) - sep_BT.astype(jnp.int32)
  return intra_BT.astype(jnp.int32), inter_BT


def greedy(model, params, prompts, max_new: int, is_separator, max_intra: int | None,
           pad_id: int = 0) -> list[np.ndarray]:
  """Continues each prompt by `max_new` argmax tokens.

  Args:
    model: a bipe_jax.model.Decoder.
    params: its parameters.
    prompts: list of B int arrays (each starting with BOS), lengths may differ.
    max_new: tokens generated per row.
    is_separator: bool [V] separator table.
    max_intra: intra ids clip to max_intra - 1.

  Returns:
    B int32 arrays of the `max_new` generated tokens.
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  b = len(prompts)
  t = -(-(int(lengths.max()) + max_new) // CHUNK) * CHUNK
  buf = np.full((b, t), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  table = jnp.asarray(np.asarray(is_separator, bool))
  done = 0
  while done < max_new:
    steps = min(CHUNK, max_new - done)
    cols = -(-(int(lengths.max()) + done + steps) // CHUNK) * CHUNK
    part = _loop(model, steps, max_intra)(params, jnp.asarray(buf[:, :cols]),
                                          jnp.asarray(lengths + done), table)
    buf[:, :cols] = np.asarray(part)
    done += steps
  return [buf[i, lengths[i]:lengths[i] + max_new] for i in range(b)]


_LOOPS = {}


def _loop(model, max_new: int, max_intra):
  key = (id(model), max_new, max_intra)
  if key not in _LOOPS:
    def run(params, buf_BT, cur_B, table_V):
      rows_B = jnp.arange(buf_BT.shape[0])
      zeros_BT = jnp.zeros_like(buf_BT)
      positions_BT = jnp.broadcast_to(jnp.arange(buf_BT.shape[1], dtype=jnp.int32), buf_BT.shape)

      def body(_, carry):
        buf_BT, cur_B = carry
        intra, inter = bilevel_ids_jnp(buf_BT, table_V, max_intra)
        batch = dict(tokens=buf_BT, intra=intra, inter=inter, positions=positions_BT,
                     doc_ids=zeros_BT)
        logits_BTV = model.apply({"params": params}, batch)
        nxt_B = jnp.argmax(logits_BTV[rows_B, cur_B - 1], axis=-1).astype(jnp.int32)
        return buf_BT.at[rows_B, cur_B].set(nxt_B), cur_B + 1

      return jax.lax.fori_loop(0, max_new, body, (buf_BT, cur_B))[0]
    _LOOPS[key] = (model, jax.jit(run))  # keeps `model` alive so its id stays unique
  return _LOOPS[key][1]
