"""A Llama-like decoder-only transformer, sharded through logical axis rules.

Embeddings, grouped-query causal attention, a SwiGLU MLP and RMS norms
(``(D,)`` scales, replicated), bf16 activations over float32 (or bf16)
parameters. The layers are either stacked on a leading axis and run with
``lax.scan`` (MaxText's default) or kept as a list and unrolled. Every
parameter names its logical axes; ``rules`` maps them to mesh axes for FSDP
(the embedding dimension over ``fsdp``) or FSDP+TP (heads, MLP and vocabulary
over ``tensor`` as well).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Config:
  """Shapes of the decoder.

  ``1b`` has Llama 3.2 1B's shapes with an untied output layer (1.50B
  params), ``8b`` Llama 3 8B's (8.03B).
  """

  name: str
  vocab: int
  dim: int
  layers: int
  heads: int
  kv_heads: int
  mlp: int
  seq: int = 1024

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads


CONFIGS = {
  "1b": Config("1b", vocab=128256, dim=2048, layers=16, heads=32, kv_heads=8, mlp=8192),
  "8b": Config(
    "8b", vocab=128256, dim=4096, layers=32, heads=32, kv_heads=8, mlp=14336
  ),
  # A few layers whose largest leaf (the embedding) is over 20% of the params.
  "tiny": Config(
    "tiny", vocab=512, dim=64, layers=2, heads=4, kv_heads=2, mlp=128, seq=16
  ),
}

# Logical axes of each parameter (the stacked layers add "layers" in front).
_LAYER_AXES = {
  "attn_norm": ("norm",),
  "wq": ("embed", "heads"),
  "wk": ("embed", "kv_heads"),
  "wv": ("embed", "kv_heads"),
  "wo": ("heads", "embed"),
  "mlp_norm": ("norm",),
  "w_gate": ("embed", "mlp"),
  "w_up": ("embed", "mlp"),
  "w_down": ("mlp", "embed"),
}
_TOP_AXES = {
  "embed": ("vocab", "embed"),
  "final_norm": ("norm",),
  "unembed": ("embed", "vocab"),
}


def rules(tensor_parallel: bool, multi_slice: bool = False) -> dict[str, Any]:
  """Logical axis -> mesh axis (``None``: replicated)."""
  batch: Any = ("slice", "fsdp") if multi_slice else "fsdp"
  out: dict[str, Any] = {"batch": batch, "embed": "fsdp", "norm": None, "layers": None}
  tp = "tensor" if tensor_parallel else None
  out.update(heads=tp, kv_heads=tp, mlp=tp, vocab=tp)
  return out


def _layer_shapes(c: Config) -> dict[str, tuple[int, ...]]:
  q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
  return {
    "attn_norm": (c.dim,),
    "wq": (c.dim, q),
    "wk": (c.dim, kv),
    "wv": (c.dim, kv),
    "wo": (q, c.dim),
    "mlp_norm": (c.dim,),
    "w_gate": (c.dim, c.mlp),
    "w_up": (c.dim, c.mlp),
    "w_down": (c.mlp, c.dim),
  }


def param_axes(c: Config, scan: bool) -> dict[str, Any]:
  """The logical axes of every parameter, as a tree shaped like the params."""
  out: dict[str, Any] = dict(_TOP_AXES)
  if scan:
    out["layers"] = {k: ("layers", *v) for k, v in _LAYER_AXES.items()}
  else:
    out["layers"] = [dict(_LAYER_AXES) for _ in range(c.layers)]
  return out


def abstract_params(c: Config, scan: bool, dtype: Any = jnp.float32) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` params (no sharding yet)."""
  layer = _layer_shapes(c)
  top = {"embed": (c.vocab, c.dim), "final_norm": (c.dim,), "unembed": (c.dim, c.vocab)}
  out: dict[str, Any] = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in top.items()}
  if scan:
    out["layers"] = {
      k: jax.ShapeDtypeStruct((c.layers, *s), dtype) for k, s in layer.items()
    }
  else:
    out["layers"] = [
      {k: jax.ShapeDtypeStruct(s, dtype) for k, s in layer.items()}
      for _ in range(c.layers)
    ]
  return out


def is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def spec(axes: tuple[str, ...], axis_rules: dict[str, Any]) -> P:
  return P(*(axis_rules.get(a) for a in axes))


def param_shardings(
  c: Config, scan: bool, mesh: Any, axis_rules: dict[str, Any]
) -> Any:
  return jax.tree.map(
    lambda axes: NamedSharding(mesh, spec(axes, axis_rules)),
    param_axes(c, scan),
    is_leaf=is_axes,
  )


def num_params(c: Config) -> int:
  layer = sum(math.prod(s) for s in _layer_shapes(c).values())
  return 2 * c.vocab * c.dim + c.dim + c.layers * layer


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
  return (y * scale.astype(jnp.float32)).astype(jnp.bfloat16)


def _layer(
  c: Config, x: jax.Array, p: dict[str, jax.Array], constrain: Any
) -> jax.Array:
  bf = lambda w: w.astype(jnp.bfloat16)
  b, s, _ = x.shape
  h = _rms_norm(x, p["attn_norm"])
  q = (h @ bf(p["wq"])).reshape(b, s, c.heads, c.head_dim)
  k = (h @ bf(p["wk"])).reshape(b, s, c.kv_heads, c.head_dim)
  v = (h @ bf(p["wv"])).reshape(b, s, c.kv_heads, c.head_dim)
  group = c.heads // c.kv_heads
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / c.head_dim**0.5
  mask = jnp.tril(jnp.ones((s, s), bool))
  logits = jnp.where(mask, logits, -1e9)
  attn = jax.nn.softmax(logits, axis=-1).astype(jnp.bfloat16)
  o = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, c.heads * c.head_dim)
  x = constrain(x + o @ bf(p["wo"]))
  h = _rms_norm(x, p["mlp_norm"])
  g = jax.nn.silu(h @ bf(p["w_gate"])) * (h @ bf(p["w_up"]))
  return constrain(x + g @ bf(p["w_down"]))


def loss(
  c: Config,
  params: dict[str, Any],
  tokens: jax.Array,
  mesh: Any,
  axis_rules: dict[str, Any],
) -> jax.Array:
  """Next-token cross-entropy of ``tokens`` (batch, seq + 1)."""
  act = NamedSharding(mesh, P(axis_rules["batch"], None, None))
  constrain = lambda x: jax.lax.with_sharding_constraint(x, act)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = constrain(params["embed"][inputs].astype(jnp.bfloat16))
  layers = params["layers"]
  if isinstance(layers, dict):
    x, _ = jax.lax.scan(lambda x, p: (_layer(c, x, p, constrain), None), x, layers)
  else:
    for p in layers:
      x = _layer(c, x, p, constrain)
  x = _rms_norm(x, params["final_norm"])
  logits = (x @ params["unembed"].astype(jnp.bfloat16)).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def batch_spec(
  mesh: Any, axis_rules: dict[str, Any], c: Config
) -> jax.ShapeDtypeStruct:
  """One sequence per data-parallel shard."""
  batch = axis_rules["batch"]
  names = batch if isinstance(batch, tuple) else (batch,)
  size = 1
  for n in names:
    size *= mesh.shape[n]
  sharding = NamedSharding(mesh, P(batch, None))
  return jax.ShapeDtypeStruct((size, c.seq + 1), jnp.int32, sharding=sharding)
