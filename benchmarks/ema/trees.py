"""Transformer-like float32 parameter trees, and gradients shaped like them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# name -> (layers, width, total parameters): ~50, ~200 and ~200 leaves.
SIZES: dict[str, tuple[int, int, int]] = {
  "64K": (2, 32, 65_536),
  "1M": (4, 128, 1_000_000),
  "16M": (16, 256, 16_000_000),
  "64M": (16, 512, 64_000_000),
}


def tree_shapes(size: str) -> dict[str, Any]:
  """Shapes of a transformer-like parameter tree of about ``size`` params.

  An embedding (its row count fills the budget), ``layers`` blocks of
  layer norms, attention (qkv and output) and MLP matrices with biases, and a
  final layer norm: ``12 * layers + 3`` leaves.
  """
  layers, d, total = SIZES[size]
  per_layer = {
    "ln1": {"scale": (d,), "bias": (d,)},
    "attn": {
      "qkv_w": (d, 3 * d),
      "qkv_b": (3 * d,),
      "out_w": (d, d),
      "out_b": (d,),
    },
    "ln2": {"scale": (d,), "bias": (d,)},
    "mlp": {"w1": (d, 4 * d), "b1": (4 * d,), "w2": (4 * d, d), "b2": (d,)},
  }
  layer_params = sum(
    int(np.prod(s)) for s in jax.tree.leaves(per_layer, is_leaf=is_shape)
  )
  vocab = max(1, (total - layers * layer_params - 2 * d) // d)
  tree: dict[str, Any] = {"embed": (vocab, d)}
  for i in range(layers):
    tree[f"layer_{i:02d}"] = per_layer
  tree["final_ln"] = {"scale": (d,), "bias": (d,)}
  return tree


def is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def num_params(size: str) -> int:
  shapes = jax.tree.leaves(tree_shapes(size), is_leaf=is_shape)
  return int(sum(np.prod(s) for s in shapes))


def num_leaves(size: str) -> int:
  return len(jax.tree.leaves(tree_shapes(size), is_leaf=is_shape))


@functools.cache
def _tree_makers(size: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
  shapes = tree_shapes(size)
  paths_shapes = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]
  treedef = jax.tree.structure(shapes, is_leaf=is_shape)

  def make(seed: int, scale: float, is_grad: bool) -> Any:
    # A cheap deterministic hash (sin of a scaled index) rather than
    # jax.random: it compiles and runs in a fraction of the time at 64M.
    leaves, offset = [], 0
    for path, shape in paths_shapes:
      size = int(np.prod(shape))
      index = jax.lax.iota(jnp.float32, size) + float(offset)
      x = scale * jnp.sin(index * 12.9898 + 78.233 * seed).reshape(shape)
      if not is_grad and "scale" in jax.tree_util.keystr(path):
        x = 1.0 + x
      leaves.append(x)
      offset += size
    return jax.tree.unflatten(treedef, leaves)

  params = jax.jit(functools.partial(make, 0, 0.02, False))
  grads = jax.jit(functools.partial(make, 1, 1e-3, True))
  return params, grads


def make_params(size: str) -> Any:
  """Fresh float32 parameters, created on the device (no host copy)."""
  return _tree_makers(size)[0]()


def make_grads(size: str) -> Any:
  """Fixed random float32 gradients shaped like the parameters."""
  return _tree_makers(size)[1]()
