"""The peers' rows: Flax NNX's ``nnx.EMA`` and Keras' ``use_ema``, on JAX."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import xla
from .runner import Runner
from .runner import host_leaves
from .settings import DECAY
from .settings import LEARNING_RATE
from .trees import make_grads
from .trees import make_params

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is first imported


def nnx_runner(size: str, *, use_ema: bool) -> Runner:
  """Flax NNX: ``nnx.Optimizer`` (+ ``nnx.EMA``) updated inside ``nnx.jit``."""
  from flax import nnx

  traces = [0]

  class Params(nnx.Module):
    def __init__(self, tree: Any) -> None:
      self.tree = nnx.data(jax.tree.map(nnx.Param, tree))

  grads_tree = make_grads(size)

  def train_step(model: Any, optimizer: Any, ema: Any, grads: Any) -> None:
    traces[0] += 1
    optimizer.update(model, grads)
    if ema is not None:
      ema.update(model)

  jitted = nnx.jit(train_step, donate_argnums=(0, 1, 2))
  grads_holder: list[Any] = []

  def init() -> Any:
    model = Params(make_params(size))
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    ema = nnx.EMA(model, decay=DECAY) if use_ema else None
    if not grads_holder:
      state = nnx.state(model, nnx.Param)
      grads_holder.append(
        jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(grads_tree))
      )
    return model, optimizer, ema

  def step(state: Any) -> Any:
    jitted(*state, grads_holder[0])
    return state

  def params(state: Any) -> list[np.ndarray]:
    return host_leaves(nnx.state(state[0], nnx.Param))

  def averages(state: Any) -> list[list[np.ndarray]]:
    return [host_leaves(state[2].params)] if use_ema else []

  def memory(state: Any) -> list[dict[str, int]]:
    return [xla.memory_stats(jitted.lower(*state, grads_holder[0]).compile())]

  return Runner(
    init,
    step,
    params,
    averages,
    memory,
    traces,
    decays=(DECAY,) if use_ema else (),
  )


def keras_runner(size: str, *, use_ema: bool) -> Runner:
  """Keras 3 on JAX: ``Adam(use_ema=...)`` via ``stateless_apply`` in jax.jit."""
  import keras

  if keras.backend.backend() != "jax":
    raise RuntimeError(
      "Keras must use the JAX backend: set KERAS_BACKEND=jax before importing "
      f"keras (it uses {keras.backend.backend()!r})."
    )
  traces = [0]
  grads = jax.tree.leaves(make_grads(size))
  optimizer = keras.optimizers.Adam(
    learning_rate=LEARNING_RATE, use_ema=use_ema, ema_momentum=DECAY
  )
  built: list[Any] = []

  def train_step(params: list[Any], opt_vars: list[Any], grads: list[Any]) -> Any:
    traces[0] += 1
    return optimizer.stateless_apply(opt_vars, grads, params)

  jitted = jax.jit(train_step, donate_argnums=(0, 1))
  zeros = jax.jit(lambda xs: [jnp.zeros_like(x) for x in xs])

  def init() -> Any:
    params = jax.tree.leaves(make_params(size))
    if not built:
      variables = [keras.Variable(p) for p in params]
      optimizer.build(variables)
      built.append(variables)
      opt_vars = [v.value for v in optimizer.variables]
    else:
      opt_vars = zeros([v.value for v in optimizer.variables])
    return params, opt_vars

  def step(state: Any) -> Any:
    return jitted(state[0], state[1], grads)

  def averages(state: Any) -> list[list[np.ndarray]]:
    if not use_ema:
      return []
    paths = [v.path for v in optimizer.variables]
    return [
      [
        np.asarray(v)
        for p, v in zip(paths, state[1], strict=True)
        if p.endswith("_average")
      ]
    ]

  def memory(state: Any) -> list[dict[str, int]]:
    return [xla.memory_stats(jitted.lower(state[0], state[1], grads).compile())]

  return Runner(
    init,
    step,
    lambda s: [np.asarray(p) for p in s[0]],
    averages,
    memory,
    traces,
    convention="keras",
    decays=(DECAY,) if use_ema else (),
  )
