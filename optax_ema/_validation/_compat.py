"""Checks of the Keras and TFA edge (:mod:`optax_ema.compat`).

Keras's optimizer keyword arguments (learning rate, its ``lr`` spelling,
``decay``, the clips) and the arguments of the stateful classes' members.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _warn


def is_real_number(x: Any) -> bool:
  """A real Python or NumPy number, or a 0-d numeric array; not a bool."""
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, numbers.Real):
    return True
  return isinstance(x, (np.ndarray, jax.Array)) and (
    np.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.number)
  )


def _check_positive(value: Any, name: str) -> None:
  if not is_real_number(value):
    raise TypeError(
      f"`{name}` must be a positive float, got {type(value).__name__}: {value!r}."
    )
  as_float = float(value)
  if math.isnan(as_float) or as_float <= 0:
    raise ValueError(f"`{name}` must be a positive float, got {value!r}.")


def check_clips(clips: dict[str, Any]) -> None:
  """Keras's clip arguments that are set: each positive, one kind of norm."""
  for key, value in clips.items():
    _check_positive(value, key)
  if "clipnorm" in clips and "global_clipnorm" in clips:
    raise ValueError(
      "Only one of `clipnorm` and `global_clipnorm` can be set, got "
      f"clipnorm={clips['clipnorm']!r} and "
      f"global_clipnorm={clips['global_clipnorm']!r}."
    )


def check_learning_rate(value: Any) -> None:
  """A learning rate: a number >= 0 or a schedule."""
  if callable(value):
    return  # a schedule
  if not is_real_number(value):
    raise TypeError(
      "`learning_rate` must be a float or a schedule `count -> learning "
      f"rate`, got {type(value).__name__}: {value!r}."
    )
  as_float = float(value)
  if math.isnan(as_float) or as_float < 0:
    raise ValueError(f"`learning_rate` must be >= 0, got {value!r}.")


def check_assigned_learning_rate(value: Any) -> None:
  """A learning rate assigned to a built optimizer: a number >= 0."""
  if callable(value) or not is_real_number(value):
    raise TypeError(
      "`learning_rate` can only be assigned a float (a schedule must be given "
      f"when the optimizer is built), got {type(value).__name__}: {value!r}."
    )
  check_learning_rate(value)


def check_lr_alias(kwargs: Mapping[str, Any], caller: str) -> None:
  """Keras's deprecated ``lr`` (in ``kwargs``): alone, and with a warning."""
  if "learning_rate" in kwargs:
    raise TypeError(
      f"`{caller}` got both `lr` and `learning_rate`; pass only `learning_rate`."
    )
  _warn.warn("`lr` is deprecated, use `learning_rate` instead.", DeprecationWarning)


def check_keras_decay(decay: Any) -> None:
  """Keras's legacy learning-rate ``decay``: a number >= 0."""
  if not is_real_number(decay):
    raise TypeError(
      f"`decay` must be a non-negative float, got {type(decay).__name__}: {decay!r}."
    )
  if math.isnan(float(decay)) or float(decay) < 0:
    raise ValueError(f"`decay` must be a non-negative float, got {decay!r}.")


def warn_learning_rate_decay(decay: Any) -> None:
  """Keras's ``decay`` is a learning-rate decay, not the average's."""
  _warn.warn(
    f"`decay`={decay!r} is Keras's legacy learning-rate decay "
    "(`learning_rate / (1 + decay * t)`), as TFA read it, not the decay "
    "of the moving average, which is `average_decay`. Keras 3 removed "
    "`decay`; pass `average_decay=` for the average and a learning-rate "
    "schedule for the optimizer."
  )


def check_built_optimizer_kwargs(
  kwargs: dict[str, Any], decay: Any, lr_name: str, caller: str
) -> None:
  """Keyword arguments that cannot take effect on an optimizer already built."""
  if decay is not None:
    raise ValueError(
      f"`{caller}` got `decay`={decay!r} for an optimizer that is already "
      "built. For the decay of the moving average, pass `average_decay=`. "
      "(`decay` is Keras's legacy learning-rate decay, which only applies to "
      "an optimizer given by name, e.g. 'sgd'.)"
    )
  if "learning_rate" in kwargs:
    raise ValueError(
      f"`{caller}` got `{lr_name}` for an optimizer that is already built, "
      "where it cannot take effect. Pass the optimizer by name (e.g. 'sgd') "
      "to set it here, or build it with it, e.g. optax.sgd(schedule)."
    )
  if kwargs:
    raise TypeError(
      f"`{caller}` got unexpected keyword argument(s): {', '.join(sorted(kwargs))}."
    )


def _check_pairs(pairs: list[Any]) -> None:
  if not pairs:
    raise ValueError("`grads_and_vars` is empty: no gradients provided.")
  for i, pair in enumerate(pairs):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise TypeError(
        "`grads_and_vars` must be a list of (gradient, param) pairs or a "
        f"(grads, params) tuple of pytrees; element {i} is a "
        f"{type(pair).__name__}, not a pair."
      )
    if any(isinstance(x, (str, bytes)) for x in pair):
      raise TypeError(
        "`grads_and_vars` pairs strings, not arrays: element "
        f"{i} is {tuple(pair)!r}. zip() over two dicts pairs their keys; pass "
        "the pytrees as a tuple, `apply_gradients((grads, params))`, or "
        "`zip(jax.tree.leaves(grads), jax.tree.leaves(params))`."
      )


def split_grads_and_vars(grads_and_vars: Any) -> tuple[Any, Any, bool]:
  """``(grads, params, as_pairs)`` from either form ``apply_gradients`` takes."""
  if isinstance(grads_and_vars, tuple) and len(grads_and_vars) == 2:
    grads, params = grads_and_vars
    return grads, params, False
  if isinstance(grads_and_vars, (Mapping, str, bytes)) or not hasattr(
    grads_and_vars, "__iter__"
  ):
    raise TypeError(
      "`grads_and_vars` must be a list of (gradient, param) pairs or a "
      f"(grads, params) tuple of pytrees, got {type(grads_and_vars).__name__}."
    )
  pairs = list(grads_and_vars)
  _check_pairs(pairs)
  return [g for g, _ in pairs], [p for _, p in pairs], True


def check_loss(loss: Any) -> None:
  """A loss to differentiate: a callable of the parameters."""
  if not callable(loss):
    raise TypeError(
      "`loss` must be a callable of the parameters, `loss(params) -> "
      f"scalar`, got {type(loss).__name__}."
    )
  try:
    takes_params = bool(inspect.signature(loss).parameters)
  except (TypeError, ValueError):
    takes_params = True
  if not takes_params:
    raise TypeError(
      "`loss` takes no arguments: JAX differentiates a function of the "
      "parameters, so pass `lambda params: ...` (the parameters come from "
      "`var_list`)."
    )


def check_initializer(initializer: Any) -> None:
  """A slot's or weight's initializer: a string is 'zeros' or 'ones'."""
  if isinstance(initializer, str) and initializer not in ("zeros", "ones"):
    raise ValueError(
      "`initializer` must be 'zeros', 'ones', a number, an array or a callable "
      f"`(shape, dtype) -> array`, got {initializer!r}."
    )


def check_not_trainable(trainable: Any) -> None:
  """Optimizer weights are not trained."""
  if trainable:
    raise ValueError(
      "`trainable` must be None or False: optimizer weights are not trained."
    )


def check_config(config: Any) -> None:
  """A config of :meth:`get_config`: a dict with an ``"optimizer"`` entry."""
  if not isinstance(config, Mapping):
    raise TypeError(f"`config` must be a dict, got {type(config).__name__}.")
  if "optimizer" not in config:
    raise ValueError("`config` has no 'optimizer' entry.")


def check_config_clash(
  optimizer_kwargs: Mapping[str, Any], kwargs: Mapping[str, Any]
) -> None:
  """No argument set both at the config's top level and in its optimizer's."""
  clash = sorted(set(optimizer_kwargs) & set(kwargs))
  if clash:
    raise ValueError(
      f"`config` sets {', '.join(clash)} both at the top level and in the "
      "optimizer's config."
    )
