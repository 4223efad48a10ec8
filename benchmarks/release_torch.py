"""Baseline for benchmarks/eval_long.py: the authors' release's evaluation pass, in PyTorch eager.

A minimal re-statement (not a copy) of what the release (HF transformers Llama
with BiPE, eager attention) computes for one evaluation window, kept to the
parts that set its cost: segment ids from separator ids inside the model, a
learned intra table added to the token embedding, per layer a dense float32
[B, H, L, L] score matrix plus a materialised [B, 1, L, L] causal mask (and,
for BiPE-ALiBi, a materialised [1, H, L, L] bias), softmax in float32, SwiGLU
MLP, untied LM head, float32 logits and the cross-entropy loss. Random
weights (std 0.02), fp32, torch.no_grad, PyTorch's default threads.

`--kind rope` / `alibi` run the same model on flat positions without the
intra table (a plain Llama with RoPE, or with ALiBi slopes x1), the
counterparts of bipe_jax's rope and alibi kinds.

Needs PyTorch (`pip install torch`; not a dependency of bipe_jax). Run alone
it measures one case and prints one JSON line; eval_long.py --baseline and
train_step.py --baseline run it in a fresh process next to their own measurements.
--train times a training step instead: forward, backward, gradient clipping
and AdamW.

  python benchmarks/release_torch.py --kind bipe_rope --length 8192
  python benchmarks/release_torch.py --train --length 1024 --batch 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEPARATORS = (13, 869)   # the release's hard-coded newline and " ." ids


def alibi_slopes(n_heads: int, multiplier: float) -> torch.Tensor:
  """Standard ALiBi slopes (ALiBi paper's rule for non-powers of two) times `multiplier`."""
  def pow2(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  p = 2 ** int(math.floor(math.log2(n_heads)))
  slopes = pow2(p) + pow2(2 * p)[0::2][: n_heads - p]
  return torch.tensor(slopes) * multiplier


class RMSNorm(nn.Module):
  def __init__(self, d, eps=1e-5):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

  def forward(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat((-x2, x1), dim=-1)


class Layer(nn.Module):
  def __init__(self, d, heads, ff):
    super().__init__()
    self.heads, self.hd = heads, d // heads
    self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
    self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
    self.down = nn.Linear(ff, d, bias=False)
    self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)

  def forward(self, x, mask, cos_sin, bias):
    b, l, d = x.shape
    h = self.norm1(x)
    split = lambda t: t.view(b, l, self.heads, self.hd).transpose(1, 2)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    if cos_sin is not None:
      cos, sin = cos_sin
      q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd)
    if bias is not None:
      scores = scores + bias
    scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    x = x + self.o(torch.matmul(probs, v).transpose(1, 2).reshape(b, l, d))
    h = self.norm2(x)
    return x + self.down(F.silu(self.gate(h)) * self.up(h))


class ReleaseModel(nn.Module):
  """bipe_* kinds as the release; rope, alibi: the same on flat positions, no intra table."""

  def __init__(self, kind, vocab=32000, d=768, layers=12, heads=12, ff=3072, max_intra=1024):
    super().__init__()
    self.kind, self.heads, self.max_intra = kind, heads, max_intra
    self.bilevel = kind.startswith("bipe_")
    self.embed = nn.Embedding(vocab, d)
    self.intra = nn.Embedding(max_intra, d, padding_idx=max_intra - 1) if self.bilevel else None
    self.layers = nn.ModuleList(Layer(d, heads, ff) for _ in range(layers))
    self.norm, self.head = RMSNorm(d), nn.Linear(d, vocab, bias=False)
    self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d // heads, 2) / (d // heads)))
    self.register_buffer("slopes", alibi_slopes(heads, 96.0 if self.bilevel else 1.0))

  def forward(self, tokens):
    b, l = tokens.shape
    is_sep = torch.zeros_like(tokens, dtype=torch.bool)
    for s in SEPARATORS:
      is_sep |= tokens == s
    inter = torch.cumsum(is_sep.long(), 1) - is_sep.long()          # separators strictly before
    idx = torch.arange(l).expand(b, l)
    start = torch.where(torch.cat([torch.ones_like(is_sep[:, :1]), is_sep[:, :-1]], 1), idx, 0)
    intra = (idx - torch.cummax(start, 1).values).clamp(max=self.max_intra - 1)
    x = self.embed(tokens)
    if self.bilevel:
      x = x + self.intra(intra)
    pos = inter if self.bilevel else idx
    mask = torch.full((l, l), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, l, l)
    cos_sin = bias = None
    if self.kind.endswith("rope"):
      freqs = pos[..., None].float() * self.inv_freq
      emb = torch.cat((freqs, freqs), -1)[:, None]
      cos_sin = (emb.cos(), emb.sin())
    else:
      rel = (pos[:, None, :] - pos[:, :, None]).float()                  # pos[j] - pos[i]
      bias = self.slopes[None, :, None, None] * rel[:, None]             # [B, H, L, L]
    for layer in self.layers:
      x = layer(x, mask, cos_sin, bias)
    logits = self.head(self.norm(x)).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _model_and_tokens(kind: str, length: int, batch: int = 1, dims: dict | None = None):
  torch.manual_seed(0)
  model = ReleaseModel(kind, **(dims or {}))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.02)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 32000, (batch, length))
  tokens[rng.random((batch, length)) < 1.0 / 13] = 13           # a line about every 13 tokens
  return model, torch.from_numpy(tokens)


def parse_dims(text: str) -> dict:
  """'d=64,layers=2,heads=2,ff=128' -> keyword arguments of ReleaseModel."""
  return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def _timed(fn, repeats: int):
  t0 = time.perf_counter()
  loss = float(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return loss, first, min(times) if times else first


def measure(kind: str, length: int, repeats: int) -> dict:
  """One evaluation pass (no_grad): loss of a [1, length] window."""
  model, tokens = _model_and_tokens(kind, length)
  model.eval()
  with torch.no_grad():
    loss, first, best = _timed(lambda: model(tokens), repeats)
  return _result(kind, length, "release eval (torch eager)", loss, first, best, length)


def train_step(kind: str, length: int, batch: int, dims: dict | None = None):
  """A function that runs one training step (forward, backward, clipping, AdamW); returns the loss."""
  model, tokens = _model_and_tokens(kind, length, batch, dims)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()
  return step


def measure_train(kind: str, length: int, batch: int, repeats: int,
                  dims: dict | None = None) -> dict:
  """One training step: forward, backward, AdamW (lr 1e-4, wd 0.01) on [batch, length]."""
  loss, first, best = _timed(train_step(kind, length, batch, dims), repeats)
  return _result(kind, length, "release train (torch eager)", loss, first, best, batch * length)


def _result(kind, length, impl, loss, first, best, tokens) -> dict:
  return dict(kind=kind, length=length, impl=impl, resolved="torch",
              loss=loss, first_call_s=first, best_s=best, tokens_per_s=tokens / best,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              load_avg=os.getloadavg()[0], torch=torch.__version__)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--kind", default="bipe_rope",
                  choices=["bipe_rope", "bipe_alibi", "rope", "alibi"])
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=2, help="timed runs after the first")
  ap.add_argument("--train", action="store_true", help="time a training step instead")
  ap.add_argument("--batch", type=int, default=1, help="rows per training step")
  ap.add_argument("--dims", default="",
                  help="model size for --train, e.g. d=64,layers=2,heads=2,ff=128 (default 151M)")
  args = ap.parse_args(argv)
  if args.train:
    print(json.dumps(measure_train(args.kind, args.length, args.batch, args.repeats,
                                   parse_dims(args.dims))))
  else:
    print(json.dumps(measure(args.kind, args.length, args.repeats)))


if __name__ == "__main__":
  main()
