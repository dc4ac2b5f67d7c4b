"""The optax rows: adam, optax_ema's moving_average, hand-written EMAs, the floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import flatten_util

import optax_ema

from . import xla
from .runner import Runner
from .runner import host_leaves
from .settings import DECAY
from .settings import LEARNING_RATE
from .trees import make_grads
from .trees import make_params
from .trees import num_params


def optax_runner(
  size: str,
  tx: optax.GradientTransformation,
  *,
  donate: bool = True,
  flat: bool = False,
  average_of: Callable[[Any], list[Any]] | None = None,
  decays: tuple[float, ...] = (),
  update_every: int = 1,
) -> Runner:
  traces = [0]
  grads = make_grads(size)
  if flat:
    grads = flatten_util.ravel_pytree(grads)[0]

  def train_step(params: Any, opt_state: Any, grads: Any) -> Any:
    traces[0] += 1
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jitted = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())

  @jax.jit
  def init_state(params: Any) -> Any:
    return tx.init(params)

  def init() -> Any:
    params = make_params(size)
    if flat:
      params = flatten_util.ravel_pytree(params)[0]
    return params, init_state(params)

  def step(state: Any) -> Any:
    return jitted(state[0], state[1], grads)

  def averages(state: Any) -> list[list[np.ndarray]]:
    if average_of is None:
      return []
    return [host_leaves(a) for a in average_of(state[1])]

  def memory(state: Any) -> list[dict[str, int]]:
    return [xla.memory_stats(jitted.lower(state[0], state[1], grads).compile())]

  return Runner(
    init,
    step,
    lambda s: host_leaves(s[0]),
    averages,
    memory,
    traces,
    decays=decays,
    update_every=update_every,
  )


def optax_ema_runner(size: str, **kwargs: Any) -> Runner:
  flat = kwargs.pop("flat", False)
  donate = kwargs.pop("donate", True)
  decay = kwargs.get("average_decay", DECAY)
  tx = optax_ema.moving_average(optax.adam(LEARNING_RATE), **kwargs)
  if isinstance(decay, tuple):
    decays = decay

    def average_of(opt_state: Any) -> list[Any]:
      return [optax_ema.averaged_params(opt_state, which=i) for i in range(len(decay))]

  else:
    decays = (decay,)

    def average_of(opt_state: Any) -> list[Any]:
      return [optax_ema.averaged_params(opt_state)]

  return optax_runner(
    size,
    tx,
    donate=donate,
    flat=flat,
    average_of=average_of,
    decays=decays,
    update_every=kwargs.get("update_every", 1),
  )


def hand_runner(size: str, *, second_call: bool) -> Runner:
  """A hand-written EMA, fused into the adam step or in a second jitted call."""
  traces = [0]
  tx = optax.adam(LEARNING_RATE)
  grads = make_grads(size)

  def ema(average: Any, params: Any) -> Any:
    return jax.tree.map(lambda e, p: e + (1.0 - DECAY) * (p - e), average, params)

  def adam_step(params: Any, opt_state: Any, grads: Any) -> Any:
    traces[0] += 1
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def fused_step(params: Any, opt_state: Any, average: Any, grads: Any) -> Any:
    params, opt_state = adam_step(params, opt_state, grads)
    return params, opt_state, ema(average, params)

  def ema_step(average: Any, params: Any) -> Any:
    traces[0] += 1
    return ema(average, params)

  fused = jax.jit(fused_step, donate_argnums=(0, 1, 2))
  first = jax.jit(adam_step, donate_argnums=(0, 1))
  second = jax.jit(ema_step, donate_argnums=(0,))

  @jax.jit
  def init_state(params: Any) -> Any:
    return tx.init(params), jax.tree.map(jnp.copy, params)

  def init() -> Any:
    params = make_params(size)
    return (params, *init_state(params))

  def step(state: Any) -> Any:
    params, opt_state, average = state
    if second_call:
      params, opt_state = first(params, opt_state, grads)
      return params, opt_state, second(average, params)
    return fused(params, opt_state, average, grads)

  def memory(state: Any) -> list[dict[str, int]]:
    params, opt_state, average = state
    if second_call:
      return [
        xla.memory_stats(first.lower(params, opt_state, grads).compile()),
        xla.memory_stats(second.lower(average, params).compile()),
      ]
    return [xla.memory_stats(fused.lower(params, opt_state, average, grads).compile())]

  return Runner(
    init,
    step,
    lambda s: host_leaves(s[0]),
    lambda s: [host_leaves(s[2])],
    memory,
    traces,
    dispatches=2 if second_call else 1,
    decays=(DECAY,),
  )


def flat_runner(size: str, kind: str) -> Runner:
  """The floor (flat EMA) and the STREAM-like scale / triad kernels."""
  n = num_params(size)
  traces = [0]

  def floor(e: jax.Array, p: jax.Array) -> jax.Array:
    traces[0] += 1
    return e + (1.0 - DECAY) * (p - e)

  def scale(b: jax.Array, a: jax.Array, s: jax.Array) -> jax.Array:
    traces[0] += 1
    del b
    return s * a

  def triad(a: jax.Array, b: jax.Array, c: jax.Array, s: jax.Array) -> jax.Array:
    traces[0] += 1
    del a
    return b + s * c

  fn = {"floor": floor, "scale": scale, "triad": triad}[kind]
  # keep_unused: scale and triad ignore their donated output buffer's values.
  jitted = jax.jit(fn, donate_argnums=(0,), keep_unused=True)
  s = jnp.float32(3.0)

  @jax.jit
  def make() -> tuple[jax.Array, ...]:
    return (
      0.02 * jnp.sin(jax.lax.iota(jnp.float32, n) * 12.9898),
      0.02 * jnp.sin(jax.lax.iota(jnp.float32, n) * 12.9898 + 78.233),
      0.02 * jnp.sin(jax.lax.iota(jnp.float32, n) * 12.9898 + 2 * 78.233),
    )

  def init() -> Any:
    return make()

  def step(state: Any) -> Any:
    x, y, z = state
    if kind == "floor":
      return jitted(x, y), y, z
    if kind == "scale":
      return jitted(x, y, s), y, z
    return jitted(x, y, z, s), y, z

  def args(state: Any) -> tuple[Any, ...]:
    x, y, z = state
    return {"floor": (x, y), "scale": (x, y, s), "triad": (x, y, z, s)}[kind]

  def memory(state: Any) -> list[dict[str, int]]:
    return [xla.memory_stats(jitted.lower(*args(state)).compile())]

  return Runner(
    init,
    step,
    lambda st: [np.asarray(x) for x in st],
    lambda st: [],
    memory,
    traces,
    decays=(DECAY,) if kind == "floor" else (),
  )
