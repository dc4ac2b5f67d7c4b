"""Checks of the averaging transforms' other options: mask, intervals, overwrite."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

from optax_ema import _averages
from optax_ema import _tree_utils
from optax_ema._validation import _decays
from optax_ema._validation import _numbers


def check_mask(mask: Any) -> None:
  """A mask is None, a callable of params, or a pytree prefix of bools.

  A bare scalar (a bool, or the array a schedule-like call returns) is
  rejected: under ``optax.inject_hyperparams`` a callable mask that is not a
  static argument is called with the step count instead of the params.
  """
  if mask is None or callable(mask):
    return
  if isinstance(mask, (str, bytes)):
    raise TypeError(f"`mask` must be a pytree of bools or a callable, got {mask!r}.")
  scalar = isinstance(mask, (bool, np.bool_, numbers.Number)) or (
    isinstance(mask, (jax.Array, np.ndarray, np.generic)) and np.ndim(mask) == 0
  )
  if scalar:
    shown = "traced" if _tree_utils.is_traced(mask) else repr(mask)
    raise TypeError(
      f"`mask` must be a pytree prefix of the params or a callable of them, "
      f"got a bare {type(mask).__name__} ({shown}). "
      "Under optax.inject_hyperparams a callable `mask` is taken for a "
      "schedule and called with the step count: pass "
      "`static_args=('mask',)` to optax.inject_hyperparams."
    )


def check_update_every(update_every: Any) -> int:
  """``update_every`` as the static interval of averaging steps (None: 1)."""
  if update_every is None:
    return 1
  return _numbers.static_int(update_every, "update_every")


def _overwrite_with(
  overwrite_with: Any, every: int, decays: _decays.AverageDecays
) -> tuple[int, int]:
  """``overwrite_with`` among the averages of ``decays``: ``(every, slot)``."""
  if not decays.several:
    if overwrite_with is not None:
      raise ValueError(
        f"`overwrite_with` must be None for a single average, got {overwrite_with!r}."
      )
    return every, 0
  labels = tuple(_averages.decay_label(d) for d in decays.decays)
  if overwrite_with is None:
    raise ValueError(
      f"`overwrite_every` with {len(decays.keys)} averages is ambiguous: pass "
      "`overwrite_with=` the one that overwrites the params, one of: "
      f"{_averages.describe_choices(decays.keys, labels, 'decay')}."
    )
  return every, _averages.resolve_which(
    overwrite_with, decays.keys, labels, "decay", name="overwrite_with"
  )


def check_overwrite(
  overwrite_every: Any,
  overwrite_with: Any,
  update_every: int,
  sequential_update: bool,
  decays: _decays.AverageDecays,
) -> tuple[int, int]:
  """``(overwrite_every, slot)``: 0 when the params are never overwritten.

  Args:
    overwrite_every: None or a positive multiple of ``update_every``.
    overwrite_with: with several averages, the one that overwrites the
      params (as ``which=``); None for a single one.
    update_every: the checked interval of averaging steps.
    sequential_update: the checked ``sequential_update``.
    decays: the checked ``average_decay``.

  Returns:
    The interval of overwrites (0: never) and the position of the average
    that overwrites the params.
  """
  if overwrite_every is None:
    if overwrite_with is not None:
      raise ValueError(
        "`overwrite_with` picks the average that overwrites the params, so it "
        "needs `overwrite_every`; got `overwrite_every=None`."
      )
    return 0, 0
  every = _numbers.static_int(overwrite_every, "overwrite_every")
  if not sequential_update:
    raise ValueError(
      "`overwrite_every` needs `sequential_update=True`: with False the average "
      "holds the params from before this step's update, and moving the params "
      "onto it would throw that update away."
    )
  if every % update_every:
    raise ValueError(
      f"`overwrite_every`={every} must be a multiple of `update_every`="
      f"{update_every}: the params can only move onto an average on a step "
      "that averages."
    )
  return _overwrite_with(overwrite_with, every, decays)
