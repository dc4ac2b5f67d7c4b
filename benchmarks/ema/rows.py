"""The table's rows, in order: what this installation of optax_ema can run."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import optax

import optax_ema

from .optax_rows import flat_runner
from .optax_rows import hand_runner
from .optax_rows import optax_ema_runner
from .optax_rows import optax_runner
from .peer_rows import keras_runner
from .peer_rows import nnx_runner
from .runner import Row
from .runner import Runner
from .settings import ADAM
from .settings import DECAYS
from .settings import FLOOR
from .settings import LEARNING_RATE
from .settings import OFFLOAD
from .settings import OFFLOAD_EVERY
from .settings import OURS
from .settings import OURS_EVERY
from .settings import SCALE
from .settings import TRIAD
from .settings import UPDATE_EVERY


def _has_update_every() -> bool:
  return "update_every" in inspect.signature(optax_ema.moving_average).parameters


def _has_offload() -> bool:
  return "offload" in inspect.signature(optax_ema.moving_average).parameters


def _accepts_several_decays() -> bool:
  try:
    optax_ema.moving_average(optax.sgd(0.1), average_decay=DECAYS)
  except (TypeError, ValueError):
    return False
  return True


def _adam(**kwargs: Any) -> Callable[[str], Runner]:
  """Makes optax.adam alone, with :func:`optax_runner`'s keyword arguments."""
  return lambda size: optax_runner(size, optax.adam(LEARNING_RATE), **kwargs)


def _ours(**kwargs: Any) -> Callable[[str], Runner]:
  """Makes moving_average(adam), with :func:`optax_ema_runner`'s keyword arguments."""
  return lambda size: optax_ema_runner(size, **kwargs)


def _adam_rows() -> list[Row]:
  """Adam alone, and moving_average(adam) in each of its settings."""
  rows = [Row(ADAM, "optax", None, _adam()), Row(OURS, "optax", ADAM, _ours())]
  if _has_update_every():
    rows.append(Row(OURS_EVERY, "optax", ADAM, _ours(update_every=UPDATE_EVERY)))
  if _accepts_several_decays():
    several = f"moving_average(adam, decays={DECAYS})"
    rows.append(Row(several, "optax", ADAM, _ours(average_decay=DECAYS)))
  if _has_offload():
    every = _ours(offload=True, update_every=UPDATE_EVERY)
    rows += [
      Row(OFFLOAD, "offload", ADAM, _ours(offload=True)),
      Row(OFFLOAD_EVERY, "offload", ADAM, every),
    ]
  return rows


def _variant_rows() -> list[Row]:
  """Hand-written EMAs, and adam with and without the EMA undonated or flat."""
  undonated, flat = "optax adam, not donated", "optax adam, flat vector"
  return [
    Row(
      "hand EMA fused in step",
      "optax",
      ADAM,
      lambda s: hand_runner(s, second_call=False),
    ),
    Row(
      "hand EMA, 2nd jitted call",
      "optax",
      ADAM,
      lambda s: hand_runner(s, second_call=True),
    ),
    Row(undonated, "undonated", None, _adam(donate=False)),
    Row(
      "moving_average(adam), not donated",
      "undonated",
      undonated,
      _ours(donate=False),
    ),
    Row(flat, "flat", None, _adam(flat=True)),
    Row(
      "moving_average(adam), flat vector",
      "flat",
      flat,
      _ours(flat=True),
    ),
  ]


def _peer_rows() -> list[Row]:
  """Flax NNX and Keras, each alone and with its EMA."""
  nnx_alone = "nnx.Optimizer(adam)"
  return [
    Row(nnx_alone, "flax nnx", None, lambda s: nnx_runner(s, use_ema=False)),
    Row(
      "nnx.Optimizer(adam) + nnx.EMA",
      "flax nnx",
      nnx_alone,
      lambda s: nnx_runner(s, use_ema=True),
    ),
    Row("keras Adam", "keras", None, lambda s: keras_runner(s, use_ema=False)),
    Row(
      "keras Adam(use_ema=True)",
      "keras",
      "keras Adam",
      lambda s: keras_runner(s, use_ema=True),
    ),
  ]


def _floor_rows() -> list[Row]:
  """The floor (a flat EMA) and the STREAM-like bandwidths."""
  return [
    Row(FLOOR, "floor", None, lambda s: flat_runner(s, "floor"), "floor"),
    Row(SCALE, "floor", None, lambda s: flat_runner(s, "scale"), "bandwidth"),
    Row(TRIAD, "floor", None, lambda s: flat_runner(s, "triad"), "bandwidth"),
  ]


def all_rows() -> list[Row]:
  """Every row this installation can run, in table order."""
  return _adam_rows() + _variant_rows() + _peer_rows() + _floor_rows()
