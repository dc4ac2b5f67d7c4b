"""Every argument check of the package, in one place.

Checks run at construction, or at trace time for values that
``optax.inject_hyperparams`` traces. Concrete values are range-checked; a
traced value passes once its type and dtype are right, since its value is not
known when the step is traced. Messages name the argument in backticks, show
the bad value and, where one exists, the fix.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _power_math

_HYPERPARAM_DTYPE_HINT = (
  "under optax.inject_hyperparams, the hyperparameters take the params' "
  "dtype unless you pass `hyperparam_dtype=jnp.float32`"
)


def is_python_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def is_concrete_scalar(x: Any) -> bool:
  """A Python number or a NumPy scalar / 0-d array (not a JAX array)."""
  return is_python_number(x) or (
    isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0
  )


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_bool(value: Any, name: str) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}: {value!r}.")


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
  out = check_real(value, name)
  if not 0.0 <= out <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
  return out


def check_positive(value: Any, name: str) -> float:
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
    shown = "a traced value" if is_traced(value) else repr(value)
    raise TypeError(
      f"`{name}` is {jnp.dtype(dtype).name} ({shown}): a decay in "
      f"{jnp.dtype(dtype).name} rounds 0.999 to 1.0 and freezes the average. "
      f"Give it as a Python float or a float32 array; {_HYPERPARAM_DTYPE_HINT}."
    )


def check_decay(value: Any, name: str = "average_decay") -> None:
  """Validates one decay: a number in [0, 1], a scalar array, or a schedule."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(
      f"`{name}` must be a float in [0, 1] or a schedule, got the bool "
      f"{value!r} (is an old positional `sequential_update` in its place? "
      "pass the other arguments by keyword)."
    )
  if callable(value):
    check_schedule(value, name)
    return
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if np.ndim(value) != 0:
      raise ValueError(
        f"`{name}` must be a scalar, got an array of shape {np.shape(value)}."
      )
    dtype = jnp.dtype(value.dtype)
    if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_):
      raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    check_float_dtype(value, name)
    if is_traced(value):
      return  # traced (optax.inject_hyperparams): its value is not known here
  elif not is_python_number(value):
    raise TypeError(
      f"`{name}` must be a float in [0, 1] or a schedule `count -> decay`, got "
      f"{type(value).__name__}: {value!r}."
    )
  as_float = float(value)
  if math.isnan(as_float) or not 0.0 <= as_float <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


# The counts a schedule is sampled at when it is built: every count up to 32,
# then four per decade up to 1e9.
SAMPLED_COUNTS = sorted({*range(33), *(int(10 ** (k / 4)) for k in range(6, 37))})


def sample_schedule(schedule: Callable[..., Any]) -> np.ndarray | None:
  """The schedule's values at :data:`SAMPLED_COUNTS`; None if they are traced.

  A schedule closing over traced values (built inside ``jit``) cannot be
  evaluated here.
  """
  counts = jnp.asarray(SAMPLED_COUNTS, jnp.int32)
  try:
    values = jax.vmap(schedule)(counts)
  except Exception:  # Python control flow on the count: one count at a time
    values = [schedule(c) for c in counts]
    if any(is_traced(v) for v in values):
      return None
    return np.asarray([np.asarray(v, np.float64) for v in values])
  if is_traced(values):
    return None
  return np.asarray(values, np.float64)


def check_schedule(schedule: Callable[..., Any], name: str) -> None:
  """Checks that a schedule maps a count to a decay in [0, 1].

  Its output must be a scalar of at least float32, and its values at
  :data:`SAMPLED_COUNTS` must be decays: a schedule that leaves [0, 1] (say a
  linear ramp past 1, or ``1 - 1 / count`` at count 0) would push the average
  away from the params.
  """
  try:
    out = jax.eval_shape(schedule, jax.ShapeDtypeStruct((), jnp.int32))
  except Exception as err:
    raise TypeError(
      f"`{name}` is callable, so it must be a schedule `count -> decay` "
      f"(an int32 scalar count in, a scalar out); calling it failed: {err}"
    ) from err
  if not (hasattr(out, "shape") and out.shape == ()):
    raise ValueError(
      f"`{name}` schedule must return a scalar, got {out!r} for an int32 count."
    )
  check_float_dtype(out, f"{name}(count)")
  values = sample_schedule(schedule)
  if values is None:
    return
  bad = [i for i, v in enumerate(values) if not 0.0 <= v <= 1.0]
  if bad:
    count, value = SAMPLED_COUNTS[bad[0]], float(values[bad[0]])
    raise ValueError(
      f"`{name}` schedule must give decays in [0, 1], but gives {value!r} at "
      f"count {count}: a decay outside [0, 1] pushes the average away from "
      "the params. Clip it, e.g. `lambda c: jnp.clip(schedule(c), 0.0, 1.0)`."
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
    if not is_traced(value) and int(value) < minimum:
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
  if isinstance(value, jax.Array) and not is_traced(value) and value.ndim == 0:
    value = int(value)
  if is_traced(value):
    raise TypeError(
      f"`{name}` must be a static Python int (it shapes the compiled step); "
      f"under optax.inject_hyperparams pass `static_args=({name!r},)`."
    )
  check_int(value, name, minimum)
  return int(value)


def check_ema_dtype(ema_dtype: Any) -> None:
  if ema_dtype is None:
    return
  if isinstance(ema_dtype, (jax.Array, np.ndarray)):
    raise TypeError(
      "`ema_dtype` must be a dtype, got an array: under "
      "optax.inject_hyperparams a dtype is callable and is taken for a "
      "schedule; pass `static_args=('ema_dtype',)` to optax.inject_hyperparams."
    )
  try:
    dtype = jnp.dtype(ema_dtype)
  except TypeError:
    raise TypeError(
      f"`ema_dtype` must be None or a floating point dtype, got {ema_dtype!r}."
    ) from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`ema_dtype` must be a floating point dtype, got {dtype.name}.")
  if jnp.finfo(dtype).bits < 16:
    raise ValueError(
      f"`ema_dtype` must be a floating point dtype of at least 16 bits, got "
      f"{dtype.name}: an average in it cannot resolve the steps of any "
      "useful decay."
    )


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
    raise TypeError(
      f"`mask` must be a pytree prefix of the params or a callable of them, "
      f"got a bare {type(mask).__name__} ({'traced' if is_traced(mask) else mask!r}). "
      "Under optax.inject_hyperparams a callable `mask` is taken for a "
      "schedule and called with the step count: pass "
      "`static_args=('mask',)` to optax.inject_hyperparams."
    )


def check_sigma_rels(sigma_rels: Any) -> tuple[float, ...]:
  """The power-EMA widths, validated and sorted."""
  limit = _power_math.SIGMA_REL_MAX
  if is_python_number(sigma_rels):
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
    out.append(check_sigma_rel(s, "sigma_rels", f" in {sigma_rels!r}"))
  if len({repr(s) for s in out}) != len(out):
    raise ValueError(f"`sigma_rels` must not repeat a value, got {sigma_rels!r}.")
  return tuple(sorted(out))


def check_sigma_rel(value: Any, name: str = "sigma_rel", context: str = "") -> float:
  """One power-EMA width, in (0, SIGMA_REL_MAX]."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (numbers.Real, np.floating)
  ):
    raise TypeError(f"`{name}` must be a float, got {value!r}{context}.")
  out = float(value)
  limit = _power_math.SIGMA_REL_MAX
  if math.isnan(out) or not 0.0 < out <= limit:
    raise ValueError(
      f"`{name}` values must be in (0, {limit:.6f}] (the widest "
      f"power-function profile), got {value!r}{context}."
    )
  return out


# The relative move per step of the parameter that the nearest-rounding
# warning assumes: a slowly moving parameter, late in training.
RELATIVE_MOVE = 1e-3


def nearest_rounding_freezes(decay: float, storage: Any) -> bool:
  """Whether round-to-nearest ``storage`` freezes an average of ``decay``.

  The rule: a parameter ``a`` moving by ``1e-3 * |a|`` per step moves its
  average by ``(1 - decay) * 1e-3 * |a|``; below half a place (ulp) of ``a``
  in ``storage``, that rounds back. Half a place is at most ``eps / 2`` of
  ``|a|`` (at a power of two), so this is ``(1 - decay) * 1e-3 < eps / 2``:
  true for every decay in (0, 1) in bfloat16, above 0.512 in float16. A
  decay of 0 (a copy) or 1 (no average) never warns.
  """
  step = 1.0 - float(np.float32(decay))
  eps = float(jnp.finfo(storage).eps)
  return 0.0 < step < 1.0 and step * RELATIVE_MOVE < eps / 2


def warn_if_unresolvable(decay: Any, storage: Any, name: str, stacklevel: int) -> None:
  """Warns when round-to-nearest storage would freeze an average of ``decay``.

  The rule is :func:`nearest_rounding_freezes`: a parameter moving by 1e-3
  of its value per step moves the average by ``(1 - decay) * 1e-3`` of it,
  and below half a place of the storage dtype every step rounds back. A
  constant decay is checked, a schedule at :data:`SAMPLED_COUNTS`; a traced
  decay cannot be, and warns as well.
  """
  eps = float(jnp.finfo(storage).eps)
  dtype = jnp.dtype(storage).name
  verdict = "is"
  if is_concrete_scalar(decay):
    if not nearest_rounding_freezes(decay, storage):
      return
    step = 1.0 - float(np.float32(decay))
    what = f"`{name}`={decay!r}: a step moves the average by {step:.2g}"
  elif callable(decay):
    values = sample_schedule(decay)
    if values is None:
      return
    below = [i for i, v in enumerate(values) if nearest_rounding_freezes(v, storage)]
    if not below:
      return
    count = SAMPLED_COUNTS[below[0]]
    what = (
      f"`{name}` (a schedule): from about count {count} on, a step moves the "
      f"average by {1.0 - values[below[0]]:.2g}"
    )
  else:
    what = (
      f"`{name}` is traced (optax.inject_hyperparams), so its value cannot be "
      "checked here: a step moves the average by (1 - decay)"
    )
    verdict = "may be"
  warnings.warn(
    f"{what} of its distance to the params, with `ema_dtype`={dtype} and "
    f"`stochastic_rounding=False`. For a parameter moving by {RELATIVE_MOVE:g} "
    f"of its value per step, (1 - decay) times that move {verdict} below "
    f"half a {dtype} place ({eps / 2:.2g} of the value at most), where "
    "round-to-nearest storage will not move. Leave `stochastic_rounding` at "
    "its default, or store the average in float32.",
    UserWarning,
    stacklevel=stacklevel + 1,
  )
