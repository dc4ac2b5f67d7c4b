"""Checks of power-profile widths: power_ema's and posthoc's ``sigma_rel``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_ema import _power_math
from optax_ema import _tree_utils


def check_sigma_rel(value: Any, what: str = "`sigma_rel`", context: str = "") -> float:
  """One power-EMA width, in (0, SIGMA_REL_MAX].

  Args:
    value: the width.
    what: how messages name it.
    context: what messages add after the value (the sequence it is in).

  Returns:
    The width, a float.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (numbers.Real, np.floating)
  ):
    raise TypeError(f"{what} must be a float, got {value!r}{context}.")
  out = float(value)
  limit = _power_math.SIGMA_REL_MAX
  if math.isnan(out) or not 0.0 < out <= limit:
    raise ValueError(
      f"{what} must be in (0, {limit:.6f}] (the widest "
      f"power-function profile), got {value!r}{context}."
    )
  return out


def check_sigma_rels(sigma_rels: Any) -> tuple[float, ...]:
  """The power-EMA widths of :func:`optax_ema.power_ema`, validated and sorted."""
  limit = _power_math.SIGMA_REL_MAX
  if _tree_utils.is_python_number(sigma_rels):
    sigma_rels = (sigma_rels,)
  if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
    raise TypeError(
      f"`sigma_rels` must be a sequence of floats in (0, {limit:.6f}], got "
      f"{sigma_rels!r}."
    )
  if not sigma_rels:
    raise ValueError("`sigma_rels` must hold at least one value, got ().")
  out = []
  for s in sigma_rels:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
      raise TypeError(f"`sigma_rels` must hold floats, got {s!r} in {sigma_rels!r}.")
    out.append(check_sigma_rel(s, "`sigma_rels` values", f" in {sigma_rels!r}"))
  if len({repr(s) for s in out}) != len(out):
    raise ValueError(f"`sigma_rels` must not repeat a value, got {sigma_rels!r}.")
  return tuple(sorted(out))


def check_sweep_widths(sigma_rels: Any) -> list[float]:
  """The widths of :func:`optax_ema.posthoc.sweep`, in their order."""
  if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
    raise TypeError(
      f"`sigma_rels` must be a sequence of widths, got {sigma_rels!r}: e.g. "
      "`np.geomspace(0.01, 0.25, 17)`."
    )
  widths = [check_sigma_rel(s) for s in sigma_rels]
  if not widths:
    raise ValueError("`sigma_rels` is empty: give at least one width.")
  return widths
