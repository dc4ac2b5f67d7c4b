"""Turning the `optimizer` argument into an optax transformation.

An optimizer is either an optax transformation, used as it is, or the name of
an optax alias (``"sgd"``, ``"adam"``, ...) built with
``optax.inject_hyperparams`` so that its learning rate lives in the optimizer
state. Keras's optimizer keyword arguments (``clipnorm``, ``clipvalue``,
``global_clipnorm``, ``lr``, ``decay``) are understood as Keras understands
them; anything else is passed to the alias, and an argument it does not take
is a TypeError.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from optax_ema import _validation
from optax_ema.compat import _keras

# What the edge takes as `optimizer` besides a transformation, in the words of
# the core's message (`_validation.check_transformation`).
BY_NAME = " or the name of an optax optimizer such as 'adam'"


@functools.cache
def optimizer_names() -> dict[str, Callable[..., optax.GradientTransformation]]:
  """Every optax alias, by name: public callables taking a ``learning_rate``."""
  names: dict[str, Callable[..., optax.GradientTransformation]] = {}
  for name in dir(optax):
    if name.startswith("_") or name.startswith("scale_by") or name != name.lower():
      continue
    with warnings.catch_warnings():
      # Reading a deprecated optax attribute may warn; it is skipped below or
      # warns again when it is actually used.
      warnings.simplefilter("ignore")
      factory = getattr(optax, name)
    if not (inspect.isfunction(factory) or isinstance(factory, functools.partial)):
      continue
    try:
      parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
      continue
    if "learning_rate" in parameters:
      names[name] = factory
  return names


def _jsonable(value: Any) -> Any:
  """Python scalars for numpy / jax scalars, so that a config is JSON."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  return value


def _resolve_name(name: str) -> tuple[str, Callable[..., Any]]:
  names = optimizer_names()
  key = name.lower()
  if key in names:
    return key, names[key]
  close = difflib.get_close_matches(key, list(names), n=4, cutoff=0.6)
  hint = (
    f" Did you mean {', '.join(repr(c) for c in close)}?"
    if close
    else f" Known names: {', '.join(sorted(names))}."
  )
  raise ValueError(f"`optimizer` {name!r} is not an optax optimizer name.{hint}")


def build_optimizer(
  optimizer: Any, kwargs: dict[str, Any], caller: str
) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  """Builds the transformation and returns it with its config.

  Args:
    optimizer: an optax transformation or the name of an optax alias.
    kwargs: the caller's extra keyword arguments (not modified).
    caller: the public function or class name, for error messages.

  Returns:
    ``(transformation, config)``. ``config`` holds ``"optimizer"`` (``{"name":
    ..., "config": {...}}`` for an optimizer given by name, else the object
    itself) and the clip keys that were set.
  """
  kwargs = dict(kwargs)
  # optax.inject_hyperparams binds a factory's `**optimizer_kwargs` catch-all
  # by name, so the keyword arguments may arrive nested under that name.
  nested = kwargs.pop("optimizer_kwargs", None)
  if isinstance(nested, dict):
    kwargs = {**nested, **kwargs}
  elif nested is not None:
    kwargs["optimizer_kwargs"] = nested
  clips = _keras.pop_clips(kwargs)
  lr_name = _keras.pop_learning_rate(kwargs, caller)
  decay = kwargs.pop("decay", None)
  if isinstance(optimizer, str):
    tx, optimizer_config = _build_by_name(optimizer, kwargs, decay, caller)
    if decay is not None:
      _validation.warn_learning_rate_decay(decay)
  else:
    _validation.check_built_optimizer_kwargs(kwargs, decay, lr_name, caller)
    _validation.check_transformation(optimizer, also=BY_NAME)
    tx, optimizer_config = optimizer, optimizer
  tx = _keras.with_clips(tx, clips)
  config: dict[str, Any] = {"optimizer": optimizer_config}
  config.update({key: _jsonable(value) for key, value in clips.items()})
  return tx, config


def _alias_kwargs(
  kwargs: dict[str, Any], parameters: Any, key: str, caller: str
) -> dict[str, Any]:
  """``kwargs`` with Keras spellings renamed to the alias's; unknown ones fail."""
  alias_kwargs = {}
  for arg, value in kwargs.items():
    target = _keras.KERAS_ARGUMENT_NAMES.get(arg)
    if arg not in parameters and target is not None and target in parameters:
      if target in kwargs:
        raise TypeError(
          f"`{caller}` got both `{arg}` and `{target}` (the same argument of "
          f"optax.{key}); pass only `{target}`."
        )
      arg = target
    alias_kwargs[arg] = value
  unknown = sorted(arg for arg in alias_kwargs if arg not in parameters)
  if unknown:
    accepted = sorted(p for p in parameters if p != "learning_rate")
    raise TypeError(
      f"`{caller}` got unexpected keyword argument(s) {', '.join(unknown)} for "
      f"optax.{key}, which takes {', '.join(accepted) or 'no other arguments'} "
      "(plus clipnorm, clipvalue, global_clipnorm, lr and decay)."
    )
  return alias_kwargs


def _static_args(parameters: Any, alias_kwargs: dict[str, Any]) -> list[str]:
  """The alias's arguments ``optax.inject_hyperparams`` must not trace.

  Callables other than learning-rate-like schedules (masks, dtypes) are not
  schedules for it to call; arguments whose default is an int (sizes and
  offsets such as adafactor's ``min_dim_size_to_factor``) feed Python
  control flow; so do types.
  """
  static = sorted(
    arg
    for arg, parameter in parameters.items()
    if isinstance(parameter.default, int) and not isinstance(parameter.default, bool)
  )
  static += sorted(
    arg
    for arg, value in alias_kwargs.items()
    if callable(value)
    and (arg == "mask" or arg.endswith("mask") or "dtype" in arg)
    and arg not in static
  )
  static += [
    arg
    for arg, value in alias_kwargs.items()
    if isinstance(value, type) and arg not in static
  ]
  return static


def _build_by_name(
  name: str, kwargs: dict[str, Any], decay: Any, caller: str
) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  key, factory = _resolve_name(name)
  parameters = inspect.signature(factory).parameters
  config_kwargs = dict(kwargs)
  if "learning_rate" not in kwargs:
    if key not in _keras.KERAS_DEFAULT_LEARNING_RATES:
      raise TypeError(
        f"`{caller}` needs `learning_rate` for the optimizer {name!r}, which "
        "has no Keras default learning rate."
      )
    kwargs["learning_rate"] = _keras.KERAS_DEFAULT_LEARNING_RATES[key]
  learning_rate = kwargs.pop("learning_rate")
  _validation.check_learning_rate(learning_rate)
  if decay is not None:
    _validation.check_keras_decay(decay)
  alias_kwargs = _alias_kwargs(kwargs, parameters, key, caller)
  static = _static_args(parameters, alias_kwargs)
  if decay is not None and float(decay) > 0:
    injected = optax.inject_hyperparams(
      _keras.with_inverse_time_decay(factory), static_args=static
    )
    tx = injected(learning_rate=learning_rate, lr_decay=decay, **alias_kwargs)
  else:
    tx = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=learning_rate, **alias_kwargs
    )
  optimizer_config = {"learning_rate": _jsonable(learning_rate)}
  optimizer_config.update(
    {k: _jsonable(v) for k, v in config_kwargs.items() if k != "learning_rate"}
  )
  if decay is not None:
    optimizer_config["decay"] = _jsonable(decay)
  return tx, {"name": key, "config": optimizer_config}


def resolve_optimizer(
  optimizer: Any, kwargs: dict[str, Any], caller: str
) -> optax.GradientTransformation:
  """Returns ``optimizer`` as a transformation, or raises a clear error.

  ``optimizer`` is an optax transformation or the name of an optax alias (see
  :func:`build_optimizer`); ``kwargs`` are the caller's extra keyword
  arguments.
  """
  return build_optimizer(optimizer, kwargs, caller)[0]
