"""Checks of plain hyperparameters: bools, strings, ints, reals and their dtypes."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _tree_utils

HYPERPARAM_DTYPE_HINT = (
  "under optax.inject_hyperparams, the hyperparameters take the params' "
  "dtype unless you pass `hyperparam_dtype=jnp.float32`"
)


def check_bool(value: Any, name: str) -> None:
  """A Python or NumPy bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}: {value!r}.")


def check_str(value: Any, name: str, show_type: bool = False) -> None:
  """A string; ``show_type`` names the type given in the message too."""
  if isinstance(value, str):
    return
  shown = f"{type(value).__name__}: {value!r}" if show_type else repr(value)
  raise TypeError(f"`{name}` must be a str, got {shown}.")


def check_real(value: Any, name: str) -> float:
  """A finite-or-infinite real Python number (not NaN, not a bool)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (numbers.Real, np.floating, np.integer)
  ):
    raise TypeError(f"`{name}` must be a real number, got {value!r}.")
  out = float(value)
  if math.isnan(out):
    raise ValueError(f"`{name}` must not be NaN, got {value!r}.")
  return out


def check_unit(value: Any, name: str) -> float:
  """A real number in [0, 1]."""
  out = check_real(value, name)
  if not 0.0 <= out <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
  return out


def check_positive(value: Any, name: str) -> float:
  """A finite real number > 0."""
  out = check_real(value, name)
  if not out > 0.0 or math.isinf(out):
    raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
  return out


def check_float_dtype(value: Any, name: str) -> None:
  """A traced or concrete float hyperparameter must be at least float32.

  ``optax.inject_hyperparams`` stores hyperparameters in the params' dtype by
  default: with bfloat16 params a decay of 0.999 becomes exactly 1.0.
  """
  dtype = getattr(value, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return
  if jnp.finfo(dtype).bits < 32:
    shown = "a traced value" if _tree_utils.is_traced(value) else repr(value)
    raise TypeError(
      f"`{name}` is {jnp.dtype(dtype).name} ({shown}): a decay in "
      f"{jnp.dtype(dtype).name} rounds 0.999 to 1.0 and freezes the average. "
      f"Give it as a Python float or a float32 array; {HYPERPARAM_DTYPE_HINT}."
    )


def check_int(
  value: Any, name: str, minimum: int = 0, allow_none: bool = False
) -> None:
  """Validates an int hyperparameter; traced integer scalars pass through."""
  if value is None and allow_none:
    return
  expected = f"an int >= {minimum}"
  if allow_none:
    expected = f"None or {expected}"
  if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.integer):
    if value.ndim != 0:
      raise ValueError(f"`{name}` must be a scalar, got shape {value.shape}.")
    if not _tree_utils.is_traced(value) and int(value) < minimum:
      raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return  # a traced value (optax.inject_hyperparams) is not known here
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(
      f"`{name}` must be {expected}, got {type(value).__name__}: {value!r}."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def static_int(value: Any, name: str, minimum: int = 1) -> int:
  """A positive Python int that shapes the compiled step (never traced)."""
  if (
    isinstance(value, jax.Array)
    and not _tree_utils.is_traced(value)
    and value.ndim == 0
  ):
    value = int(value)
  if _tree_utils.is_traced(value):
    raise TypeError(
      f"`{name}` must be a static Python int (it shapes the compiled step); "
      f"under optax.inject_hyperparams pass `static_args=({name!r},)`."
    )
  check_int(value, name, minimum)
  return int(value)
