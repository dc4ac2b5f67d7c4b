"""Collectives of the sharded-``jit`` guide's recipe, on a 2x4 CPU mesh.

The guide (``docs/guides/integrations.md``) passes the state's shardings from
:func:`optax_ema.state_shardings` as ``in_shardings`` and ``out_shardings`` of
a donated step. This compiles that train step (the gradient of a small
regression through a ``P("data", "model")`` matrix, a ``P("model")`` bias and
a replicated ``(D,)`` norm, on a batch sharded over ``"data"``, then the
update), with ``adamw`` alone, ``moving_average(adamw)`` and
a hand-written EMA (``optax.incremental_update`` in the same step), and
counts the collectives of each (``metrics.hlo_summary``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema

from . import metrics
from . import rows as rows_lib


def _mesh() -> Any:
  devices = jax.devices("cpu")
  if len(devices) < 8:
    raise ValueError("the recipe needs 8 CPU devices (jax_num_cpu_devices=8).")
  return jax.sharding.Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "model"))


def optimizers() -> dict[str, rows_lib.Optimizer]:
  adamw = lambda: optax.adamw(1e-3)
  ema = rows_lib.from_transform(optax_ema.moving_average(adamw(), 0.999))
  inner = adamw()

  def init(params: Any) -> Any:
    return inner.init(params), jax.tree.map(jnp.copy, params)

  def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    opt_state, average = state
    updates, opt_state = inner.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, (opt_state, optax.incremental_update(params, average, 0.001))

  def shardings(params: Any, param_shardings: Any) -> Any:
    return optax_ema.state_shardings(inner, params, param_shardings), param_shardings

  return {
    "adamw": rows_lib.from_transform(adamw()),
    "moving_average(adamw)": ema,
    "hand-written EMA": rows_lib.Optimizer(init, step, shardings),
  }


def _loss(params: Any, x: jax.Array) -> jax.Array:
  y = (x @ params["w"] + params["b"]) * params["norm"]
  return jnp.mean((y - 1.0) ** 2)


def collectives() -> dict[str, dict[str, int]]:
  """Row -> collectives by kind of the recipe's compiled, donated step."""
  mesh = _mesh()
  p_shardings = {
    "w": NamedSharding(mesh, P("data", "model")),
    "b": NamedSharding(mesh, P("model")),
    "norm": NamedSharding(mesh, P()),
  }
  shapes = {"w": (64, 128), "b": (128,), "norm": (128,)}
  params = {
    k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=p_shardings[k])
    for k, s in shapes.items()
  }
  batch = jax.ShapeDtypeStruct(
    (16, 64), jnp.float32, sharding=NamedSharding(mesh, P("data"))
  )
  out = {}
  for name, opt in optimizers().items():
    s_shardings = opt.shardings(params, p_shardings)
    state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(opt.init, params),
      s_shardings,
    )

    def train_step(p: Any, s: Any, x: Any, opt: rows_lib.Optimizer = opt) -> Any:
      grads = jax.grad(_loss)(p, x)
      return opt.step(p, grads, s)

    fn = jax.jit(
      train_step,
      in_shardings=(p_shardings, s_shardings, batch.sharding),
      out_shardings=(p_shardings, s_shardings),
      donate_argnums=(0, 1),
    )
    hlo = fn.lower(params, state, batch).compile().as_text()
    out[name] = metrics.hlo_summary(hlo)["collectives"]
  return out
