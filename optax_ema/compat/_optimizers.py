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
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _transform

# Keras's default learning rate for each optimizer it has under the same name
# (tf.keras 2.x and Keras 3 agree on these).
KERAS_DEFAULT_LEARNING_RATES: dict[str, float] = {
  "adadelta": 0.001,
  "adafactor": 0.001,
  "adagrad": 0.001,
  "adam": 0.001,
  "adamax": 0.001,
  "adamw": 0.001,
  "lamb": 0.001,
  "lion": 0.001,
  "nadam": 0.001,
  "rmsprop": 0.001,
  "sgd": 0.01,
}

# Keras spellings of alias arguments -> optax spellings. A rename applies only
# when the alias takes the optax name and not the Keras one (e.g. ``rho`` is
# RMSprop's ``decay`` in optax, but Adadelta's own ``rho``).
_KERAS_ARGUMENT_NAMES: dict[str, str] = {
  "beta_1": "b1",
  "beta_2": "b2",
  "epsilon": "eps",
  "rho": "decay",
}

CLIP_KEYS = ("clipnorm", "clipvalue", "global_clipnorm")


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


def _is_real_number(x: Any) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, numbers.Real):
    return True
  return isinstance(x, (np.ndarray, jax.Array)) and (
    np.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.number)
  )


def _jsonable(value: Any) -> Any:
  """Python scalars for numpy / jax scalars, so that a config is JSON."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  return value


def _check_positive(value: Any, name: str) -> None:
  if not _is_real_number(value):
    raise TypeError(
      f"`{name}` must be a positive float, got {type(value).__name__}: {value!r}."
    )
  as_float = float(value)
  if math.isnan(as_float) or as_float <= 0:
    raise ValueError(f"`{name}` must be a positive float, got {value!r}.")


def _check_learning_rate(value: Any) -> None:
  if callable(value):
    return  # a schedule
  if not _is_real_number(value):
    raise TypeError(
      "`learning_rate` must be a float or a schedule `count -> learning "
      f"rate`, got {type(value).__name__}: {value!r}."
    )
  as_float = float(value)
  if math.isnan(as_float) or as_float < 0:
    raise ValueError(f"`learning_rate` must be >= 0, got {value!r}.")


def clip_by_leaf_norm(max_norm: float) -> optax.GradientTransformation:
  """Keras's ``clipnorm``: each gradient leaf rescaled to an L2 norm <= max_norm.

  Every leaf ``g`` becomes ``g * max_norm / max(||g||_2, max_norm)``, as
  ``tf.clip_by_norm`` computes it (unlike ``optax.clip_by_block_rms``, which
  clips the root-mean-square).
  """

  def update_fn(updates, state, params=None):
    del params

    def clip(g: Any) -> Any:
      if g is None:
        return None
      g = jnp.asarray(g)
      norm = jnp.sqrt(
        jnp.sum(jnp.abs(g.astype(jnp.promote_types(g.dtype, jnp.float32))) ** 2)
      )
      scale = max_norm / jnp.maximum(norm, max_norm)
      return (g * scale).astype(g.dtype)

    return jax.tree.map(clip, updates, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class InverseTimeDecayState(NamedTuple):
  """State of an alias whose learning rate decays as ``lr / (1 + decay * t)``.

  Attributes:
    count: int32 scalar, the number of updates applied so far.
    inner_state: the alias's state.
  """

  # `count` shadows tuple.count, as in optax's states; the field name is the
  # layout of users' checkpoints.
  count: jax.Array  # type: ignore[assignment]
  inner_state: optax.OptState


def _with_inverse_time_decay(
  factory: Callable[..., optax.GradientTransformation],
) -> Callable[..., optax.GradientTransformation]:
  """``factory`` with an extra ``lr_decay``: Keras's legacy learning-rate decay.

  The returned factory has the signature of ``factory`` plus ``lr_decay`` (not
  ``decay``, which is RMSprop's own argument in optax), so
  that ``optax.inject_hyperparams`` keeps both the base learning rate and the
  decay in the state; step ``t`` (counted from 0) uses
  ``learning_rate / (1 + lr_decay * t)``.
  """

  def make(
    learning_rate: Any, lr_decay: Any, **kwargs: Any
  ) -> optax.GradientTransformation:
    def init_fn(params: optax.Params) -> InverseTimeDecayState:
      inner = factory(learning_rate=learning_rate, **kwargs)
      return InverseTimeDecayState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
      step = state.count.astype(jnp.result_type(learning_rate, jnp.float32))
      decayed = learning_rate / (1 + lr_decay * step)
      inner = optax.with_extra_args_support(factory(learning_rate=decayed, **kwargs))
      updates, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args
      )
      return updates, InverseTimeDecayState(
        optax.safe_increment(state.count), inner_state
      )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  signature = inspect.signature(factory)
  parameters = list(signature.parameters.values())
  decay = inspect.Parameter("lr_decay", inspect.Parameter.KEYWORD_ONLY, default=0.0)
  # Keyword-only parameters go last; ``lr_decay`` joins them.
  make.__signature__ = signature.replace(parameters=[*parameters, decay])  # type: ignore[attr-defined]
  return make


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
  optimizer: Any, kwargs: dict[str, Any], caller: str, stacklevel: int = 3
) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  """Builds the transformation and returns it with its config.

  Args:
    optimizer: an optax transformation or the name of an optax alias.
    kwargs: the caller's extra keyword arguments (not modified).
    caller: the public function or class name, for error messages.
    stacklevel: where the DeprecationWarning for ``lr`` points (3: the
      caller's caller).

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
  clips = {key: kwargs.pop(key) for key in CLIP_KEYS if key in kwargs}
  clips = {key: value for key, value in clips.items() if value is not None}
  for key, value in clips.items():
    _check_positive(value, key)
  if "clipnorm" in clips and "global_clipnorm" in clips:
    raise ValueError(
      "Only one of `clipnorm` and `global_clipnorm` can be set, got "
      f"clipnorm={clips['clipnorm']!r} and "
      f"global_clipnorm={clips['global_clipnorm']!r}."
    )
  lr_name = "learning_rate"
  if "lr" in kwargs:
    if "learning_rate" in kwargs:
      raise TypeError(
        f"`{caller}` got both `lr` and `learning_rate`; pass only `learning_rate`."
      )
    warnings.warn(
      "`lr` is deprecated, use `learning_rate` instead.",
      DeprecationWarning,
      stacklevel=stacklevel,
    )
    kwargs["learning_rate"] = kwargs.pop("lr")
    lr_name = "lr"
  decay = kwargs.pop("decay", None)

  if isinstance(optimizer, str):
    tx, optimizer_config = _build_by_name(optimizer, kwargs, decay, caller)
    if decay is not None:
      warnings.warn(
        f"`decay`={decay!r} is Keras's legacy learning-rate decay "
        "(`learning_rate / (1 + decay * t)`), as TFA read it, not the decay "
        "of the moving average, which is `average_decay`. Keras 3 removed "
        "`decay`; pass `average_decay=` for the average and a learning-rate "
        "schedule for the optimizer.",
        UserWarning,
        stacklevel=stacklevel,
      )
  else:
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
    _transform.check_transformation(optimizer)
    tx, optimizer_config = optimizer, optimizer

  transforms = []
  if "clipvalue" in clips:
    transforms.append(optax.clip(clips["clipvalue"]))
  if "clipnorm" in clips:
    transforms.append(clip_by_leaf_norm(clips["clipnorm"]))
  if "global_clipnorm" in clips:
    transforms.append(optax.clip_by_global_norm(clips["global_clipnorm"]))
  if transforms:
    tx = optax.chain(*transforms, tx)
  config: dict[str, Any] = {"optimizer": optimizer_config}
  config.update({key: _jsonable(value) for key, value in clips.items()})
  return tx, config


def _build_by_name(
  name: str, kwargs: dict[str, Any], decay: Any, caller: str
) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  key, factory = _resolve_name(name)
  parameters = inspect.signature(factory).parameters
  config_kwargs = dict(kwargs)
  if "learning_rate" not in kwargs:
    if key not in KERAS_DEFAULT_LEARNING_RATES:
      raise TypeError(
        f"`{caller}` needs `learning_rate` for the optimizer {name!r}, which "
        "has no Keras default learning rate."
      )
    kwargs["learning_rate"] = KERAS_DEFAULT_LEARNING_RATES[key]
  learning_rate = kwargs.pop("learning_rate")
  _check_learning_rate(learning_rate)
  if decay is not None:
    if not _is_real_number(decay):
      raise TypeError(
        f"`decay` must be a non-negative float, got {type(decay).__name__}: {decay!r}."
      )
    if math.isnan(float(decay)) or float(decay) < 0:
      raise ValueError(f"`decay` must be a non-negative float, got {decay!r}.")

  alias_kwargs = {}
  for arg, value in kwargs.items():
    target = _KERAS_ARGUMENT_NAMES.get(arg)
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

  # Callables other than learning-rate-like schedules are static arguments
  # (masks, dtypes), not schedules for inject_hyperparams to call; so are
  # arguments whose default is an int (sizes and offsets such as adafactor's
  # `min_dim_size_to_factor`, used in Python control flow).
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
  if decay is not None and float(decay) > 0:
    injected = optax.inject_hyperparams(
      _with_inverse_time_decay(factory), static_args=static
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
  return build_optimizer(optimizer, kwargs, caller, stacklevel=4)[0]
