"""Forward+backward time of the 151M model's SwiGLU MLP on [B, L, D] rows vs flattened [B*L, D] rows.

The same math (jnp, float32, batch 1 x 1024 tokens, D 768, F 3072), jitted,
best of 5 after a compile run; prints both times and their ratio. This is why
bipe_jax.model.MLP flattens its rows.

  python benchmarks/mlp_layout.py
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from timing import best_seconds


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--tokens", type=int, default=1024)
  ap.add_argument("--d", type=int, default=768)
  ap.add_argument("--f", type=int, default=3072)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  w = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
       for s in ((args.d, args.f), (args.d, args.f), (args.f, args.d))]
  x_BLD = jnp.asarray(rng.standard_normal((1, args.tokens, args.d), np.float32))

  def mlp_3d(w, x):
    g, u, d = w
    h = jax.nn.silu(jnp.einsum("bld,df->blf", x, g)) * jnp.einsum("bld,df->blf", x, u)
    return jnp.einsum("blf,fd->bld", h, d)

  def mlp_2d(w, x):
    g, u, d = w
    b, l, _ = x.shape
    x = x.reshape(b * l, -1)
    return ((jax.nn.silu(x @ g) * (x @ u)) @ d).reshape(b, l, -1)

  times = {}
  for name, mlp in (("[B, L, D]", mlp_3d), ("[B*L, D]", mlp_2d)):
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(mlp(w, x) * x), (0, 1)))
    times[name] = best_seconds(grad, w, x_BLD, repeats=5) * 1e3
    print(f"{name:<10} forward+backward {times[name]:7.1f} ms", flush=True)
  print(f"[B, L, D] / [B*L, D]: {times['[B, L, D]'] / times['[B*L, D]']:.2f}")


if __name__ == "__main__":
  main()
