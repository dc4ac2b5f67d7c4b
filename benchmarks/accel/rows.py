"""The optimizer configurations compared: one row each.

A row builds an ``Optimizer``: ``init(params) -> state``, ``step(params,
grads, state) -> (params, state)`` (update and apply, as a training loop
does) and ``shardings(params, param_shardings)`` for the state, taken from
:func:`optax_ema.state_shardings` (the guide's recipe) for every optax
transformation. ``baseline`` names the row each one is compared with (adam
alone, or adam inside the same ``MultiSteps`` / ``apply_if_finite``), and
``main`` marks the rows run on every target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_ema

LEARNING_RATE = 1e-4
DECAY = 0.999
DECAYS = (0.99, 0.999, 0.9999)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  init: Callable[[Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]
  shardings: Callable[[Any, Any], Any]


def from_transform(tx: optax.GradientTransformation) -> Optimizer:
  def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Optimizer(
    tx.init,
    step,
    lambda params, shardings: optax_ema.state_shardings(tx, params, shardings),
  )


def hand_fused(decays: Sequence[float]) -> Optimizer:
  """Adam plus ``optax.incremental_update`` per average, in the same step."""
  adam = optax.adam(LEARNING_RATE)

  def init(params: Any) -> Any:
    return adam.init(params), tuple(jax.tree.map(jnp.copy, params) for _ in decays)

  def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    inner, emas = state
    updates, inner = adam.update(grads, inner, params)
    params = optax.apply_updates(params, updates)
    emas = tuple(
      optax.incremental_update(params, ema, 1.0 - d)
      for ema, d in zip(emas, decays, strict=True)
    )
    return params, (inner, emas)

  def shardings(params: Any, param_shardings: Any) -> Any:
    inner = optax_ema.state_shardings(adam, params, param_shardings)
    return inner, tuple(param_shardings for _ in decays)

  return Optimizer(init, step, shardings)


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration.

  Attributes:
    name: the row's name in the tables.
    build: returns the ``Optimizer``.
    baseline: the row it is compared with.
    main: run on every target (the others: on the 256-chip TPU and H100 x8).
    gated: averages on some steps only (a skip step exists).
    param_dtype: the parameters' dtype.
    offload: keeps averages in host memory.
  """

  name: str
  build: Callable[[], Optimizer]
  baseline: str = "adam"
  main: bool = False
  gated: bool = False
  param_dtype: Any = jnp.float32
  offload: bool = False


def _ma(*args: Any, **kwargs: Any) -> Callable[[], Optimizer]:
  return lambda: from_transform(optax_ema.moving_average(*args, **kwargs))


def _adam() -> optax.GradientTransformation:
  return optax.adam(LEARNING_RATE)


def _multi() -> optax.GradientTransformation:
  return optax.MultiSteps(_adam(), every_k_schedule=4).gradient_transformation()


def _finite() -> optax.GradientTransformation:
  return optax.apply_if_finite(_adam(), max_consecutive_errors=3)


ROWS: dict[str, Row] = {
  r.name: r
  for r in (
    Row("adam", lambda: from_transform(_adam()), baseline="adam", main=True),
    Row("hand-fused", lambda: hand_fused((DECAY,)), main=True),
    Row("hand-fused, 3 decays", lambda: hand_fused(DECAYS)),
    Row("moving_average", _ma(_adam(), DECAY), main=True),
    Row("moving_average, 3 decays", _ma(_adam(), DECAYS)),
    Row("debias", _ma(_adam(), DECAY, debias=True)),
    Row("update_every=10", _ma(_adam(), DECAY, update_every=10), main=True, gated=True),
    Row("skip_nonfinite", _ma(_adam(), DECAY, skip_nonfinite=True), gated=True),
    Row(
      "ema_dtype=bf16, stochastic rounding",
      _ma(_adam(), DECAY, ema_dtype=jnp.bfloat16, stochastic_rounding=True),
    ),
    Row(
      "adam, bf16 params",
      lambda: from_transform(_adam()),
      baseline="adam, bf16 params",
      param_dtype=jnp.bfloat16,
    ),
    Row(
      "bf16 params, f32 average",
      _ma(_adam(), DECAY),
      baseline="adam, bf16 params",
      param_dtype=jnp.bfloat16,
    ),
    Row(
      "MultiSteps(adam, 4)",
      lambda: from_transform(_multi()),
      baseline="MultiSteps(adam, 4)",
      main=True,
    ),
    Row(
      "moving_average(MultiSteps)",
      lambda: from_transform(optax_ema.moving_average(_multi(), DECAY)),
      baseline="MultiSteps(adam, 4)",
      main=True,
      gated=True,
    ),
    Row(
      "apply_if_finite(adam)",
      lambda: from_transform(_finite()),
      baseline="apply_if_finite(adam)",
    ),
    Row(
      "moving_average(apply_if_finite)",
      lambda: from_transform(optax_ema.moving_average(_finite(), DECAY)),
      baseline="apply_if_finite(adam)",
      gated=True,
    ),
    Row("offload", _ma(_adam(), DECAY, offload=True), main=True, offload=True),
    Row(
      "offload, update_every=10",
      _ma(_adam(), DECAY, offload=True, update_every=10),
      gated=True,
      offload=True,
    ),
    Row("power_ema", lambda: from_transform(optax_ema.power_ema(_adam()))),
    Row("swa", lambda: from_transform(optax_ema.swa(_adam(), 0, 10)), gated=True),
    Row("overwrite_every=10", _ma(_adam(), DECAY, overwrite_every=10), gated=True),
  )
}

MAIN = [name for name, row in ROWS.items() if row.main]


def needed(names: Sequence[str]) -> list[str]:
  """``names`` with the baselines they need, in the table's order."""
  want = set(names) | {ROWS[n].baseline for n in names}
  return [n for n in ROWS if n in want]
