"""Checks of decays: numbers, schedules (sampled once), ``average_decay`` and debias.

A schedule is sampled at :data:`SAMPLED_COUNTS` once, when it is checked;
the samples travel with it (:class:`DecayLeaf`) to every later check that
reads its values (debias, the storage's rounding), so a schedule given once
is evaluated once, however many checks look at it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _power_math
from optax_ema import _rules
from optax_ema import _tree_utils
from optax_ema._validation import _numbers

# The counts a schedule is sampled at when it is built: every count up to 32,
# then four per decade up to 1e9.
SAMPLED_COUNTS = sorted({*range(33), *(int(10 ** (k / 4)) for k in range(6, 37))})


class DecayLeaf(NamedTuple):
  """One decay as given (a number, a scalar array or a schedule), checked.

  Attributes:
    value: the decay.
    samples: for a schedule, its float64 values at :data:`SAMPLED_COUNTS`;
      ``None`` for anything else, and for a schedule whose values are
      traced (built inside ``jit``).
  """

  value: Any
  samples: np.ndarray | None


class AverageDecays(NamedTuple):
  """``average_decay``, checked: one decay spec per average.

  Attributes:
    decays: one spec per average: a decay, a schedule or an
      :class:`~optax_ema._rules.PerLeafDecay`.
    keys: their keys (``0, 1, ...`` for a tuple or list, the dict's keys).
    several: whether ``average_decay`` asked for several averages.
    leaves: every decay of every spec, in order (a per-leaf spec gives one
      per leaf of its prefix), with its samples.
  """

  decays: tuple[Any, ...]
  keys: tuple[Any, ...]
  several: bool
  leaves: tuple[DecayLeaf, ...]


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
    if any(_tree_utils.is_traced(v) for v in values):
      return None
    return np.asarray([np.asarray(v, np.float64) for v in values])
  if _tree_utils.is_traced(values):
    return None
  return np.asarray(values, np.float64)


def check_schedule(schedule: Callable[..., Any], name: str) -> np.ndarray | None:
  """Checks that a schedule maps a count to a decay in [0, 1].

  Its output must be a scalar of at least float32, and its values at
  :data:`SAMPLED_COUNTS` must be decays: a schedule that leaves [0, 1] (say a
  linear ramp past 1, or ``1 - 1 / count`` at count 0) would push the average
  away from the params.

  Returns:
    The samples (:func:`sample_schedule`).
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
  _numbers.check_float_dtype(out, f"{name}(count)")
  values = sample_schedule(schedule)
  if values is None:
    return None
  bad = [i for i, v in enumerate(values) if not 0.0 <= v <= 1.0]
  if bad:
    count, value = SAMPLED_COUNTS[bad[0]], float(values[bad[0]])
    raise ValueError(
      f"`{name}` schedule must give decays in [0, 1], but gives {value!r} at "
      f"count {count}: a decay outside [0, 1] pushes the average away from "
      "the params. Clip it, e.g. `lambda c: jnp.clip(schedule(c), 0.0, 1.0)`."
    )
  return values


def check_decay(value: Any, name: str = "average_decay") -> np.ndarray | None:
  """Validates one decay: a number in [0, 1], a scalar array, or a schedule.

  Returns:
    A schedule's samples (:func:`check_schedule`); ``None`` for a number.
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(
      f"`{name}` must be a float in [0, 1] or a schedule, got the bool "
      f"{value!r} (is an old positional `sequential_update` in its place? "
      "pass the other arguments by keyword)."
    )
  if callable(value):
    return check_schedule(value, name)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if np.ndim(value) != 0:
      raise ValueError(
        f"`{name}` must be a scalar, got an array of shape {np.shape(value)}."
      )
    dtype = jnp.dtype(value.dtype)
    if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_):
      raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    _numbers.check_float_dtype(value, name)
    if _tree_utils.is_traced(value):
      return None  # traced (optax.inject_hyperparams): its value is not known here
  elif not _tree_utils.is_python_number(value):
    raise TypeError(
      f"`{name}` must be a float in [0, 1] or a schedule `count -> decay`, got "
      f"{type(value).__name__}: {value!r}."
    )
  as_float = float(value)
  if math.isnan(as_float) or not 0.0 <= as_float <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
  return None


def _check_leaf(value: Any, name: str, sampled: dict[int, Any]) -> DecayLeaf:
  """One decay, checked; a schedule already checked in this call is not again."""
  if callable(value) and id(value) in sampled:
    return DecayLeaf(value, sampled[id(value)])
  samples = check_decay(value, name)
  if callable(value):
    sampled[id(value)] = samples
  return DecayLeaf(value, samples)


def _check_spec(decay: Any, name: str, sampled: dict[int, Any]) -> list[DecayLeaf]:
  """One average's decay: a number, a schedule or a per-leaf tree of them."""
  if not isinstance(decay, _rules.PerLeafDecay):
    return [_check_leaf(decay, name, sampled)]
  leaves, _ = jax.tree_util.tree_flatten_with_path(decay.prefix, is_leaf=callable)
  if not leaves:
    raise ValueError(f"`{name}` per_leaf tree holds no decay: {decay!r}.")
  return [
    _check_leaf(leaf, f"{name}{jax.tree_util.keystr(path)}", sampled)
    for path, leaf in leaves
  ]


def _split(average_decay: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], list[str]]:
  """``(decays, keys, names)``: one entry per average, named as in messages."""
  if isinstance(average_decay, (tuple, list)):
    if not average_decay:
      raise ValueError("`average_decay` is an empty sequence; give at least one.")
    decays = tuple(average_decay)
    keys = tuple(range(len(decays)))
    return decays, keys, [f"average_decay[{i}]" for i in keys]
  if isinstance(average_decay, dict):
    if not average_decay:
      raise ValueError("`average_decay` is an empty dict; give at least one.")
    for k in average_decay:
      if not isinstance(k, str):
        raise TypeError(
          f"`average_decay` dict keys must be strings, got {k!r} (use a tuple "
          "of decays for averages picked by position)."
        )
    keys = tuple(average_decay)
    decays = tuple(average_decay[k] for k in keys)
    return decays, keys, [f"average_decay[{k!r}]" for k in keys]
  return (average_decay,), (0,), ["average_decay"]


def check_average_decay(average_decay: Any) -> AverageDecays:
  """``average_decay`` split into one decay spec per average, each checked.

  A tuple/list of decays keeps one average per entry (keys ``0, 1, ...``), a
  dict one per key; anything else is one average (key ``0``). Every
  schedule is sampled once (the same schedule object given twice, once).

  Args:
    average_decay: as :func:`optax_ema.moving_average` takes it.

  Returns:
    An :class:`AverageDecays`.
  """
  decays, keys, names = _split(average_decay)
  sampled: dict[int, Any] = {}
  leaves = []
  for decay, name in zip(decays, names, strict=True):
    leaves += _check_spec(decay, name, sampled)
  several = isinstance(average_decay, (tuple, list, dict))
  return AverageDecays(decays, keys, several, tuple(leaves))


def check_debias(
  debias: bool,
  decays: AverageDecays,
  num_updates: Any,
  dynamic_decay: bool,
  start_step: Any,
) -> None:
  """``debias=True`` with a decay of 1: nothing would ever be averaged.

  A constant 1, or a schedule that is 1 at every sampled count; unless
  ``num_updates``, ``dynamic_decay`` or ``start_step`` make some steps
  average all the same.
  """
  late = not (_tree_utils.is_concrete_scalar(start_step) and start_step == 0)
  if not debias or num_updates is not None or dynamic_decay or late:
    return
  for d, samples in decays.leaves:
    if callable(d):
      if samples is not None and np.all(samples.astype(np.float32) == 1.0):
        raise ValueError(
          f"`debias=True` with an `average_decay` schedule ({d!r}) that is 1 "
          f"at every count checked ({SAMPLED_COUNTS[0]} to "
          f"{SAMPLED_COUNTS[-1]}): it never moves the average, so "
          "the debiased average holds nothing and reads as the live params. "
          "Use a schedule below 1, or drop `debias`."
        )
    elif _tree_utils.is_concrete_scalar(d) and float(np.float32(d)) == 1.0:
      raise ValueError(
        f"`debias=True` with `average_decay`={d!r}: a decay of 1 never "
        "moves the average, so the debiased average holds nothing and "
        "reads as the live params at every step. Use a decay below 1 "
        "(e.g. 0.999), or drop `debias` for an average frozen at the "
        "initial params."
      )


def check_decay_bounds(max_decay: Any, min_decay: Any) -> tuple[float, float]:
  """``(max_decay, min_decay)``: each in [0, 1], in that order."""
  max_decay = _numbers.check_unit(max_decay, "max_decay")
  min_decay = _numbers.check_unit(min_decay, "min_decay")
  if min_decay > max_decay:
    raise ValueError(
      f"`min_decay` must be <= `max_decay`, got {min_decay!r} > {max_decay!r}."
    )
  return max_decay, min_decay


def check_half_life_decay(decay: Any) -> float:
  """A concrete decay with a half-life: in (0, 1)."""
  d = _numbers.check_unit(decay, "decay")
  if d in (0.0, 1.0):
    raise ValueError(f"`decay` must be in (0, 1) to have a half-life, got {decay!r}.")
  return d


def check_power_profile(gamma: Any, sigma_rel: Any) -> float:
  """The exponent of a power profile given by exactly one of its two names."""
  if (gamma is None) == (sigma_rel is None):
    raise ValueError(
      "`power` needs exactly one of `gamma` and `sigma_rel`, got "
      f"gamma={gamma!r}, sigma_rel={sigma_rel!r}."
    )
  if sigma_rel is not None:
    return float(
      _power_math.sigma_rel_to_gamma(_numbers.check_real(sigma_rel, "sigma_rel"))
    )
  g = _numbers.check_real(gamma, "gamma")
  _power_math.gamma_to_sigma_rel(g)  # raises on gamma <= -1
  return g
