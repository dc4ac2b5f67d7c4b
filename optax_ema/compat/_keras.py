"""Keras's optimizer arguments, in optax terms.

Keras's default learning rates, its spellings of the aliases' arguments, its
gradient clipping (``clipnorm`` per leaf, ``clipvalue``, ``global_clipnorm``,
applied before the optimizer) and its legacy inverse-time learning-rate
``decay``, as TensorFlow Addons' optimizers understood them.
"""

from __future__ import annotations

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
KERAS_ARGUMENT_NAMES: dict[str, str] = {
  "beta_1": "b1",
  "beta_2": "b2",
  "epsilon": "eps",
  "rho": "decay",
}

CLIP_KEYS = ("clipnorm", "clipvalue", "global_clipnorm")


def is_real_number(x: Any) -> bool:
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


def check_learning_rate(value: Any) -> None:
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


def with_inverse_time_decay(
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


def pop_clips(kwargs: dict[str, Any]) -> dict[str, Any]:
  """Takes Keras's clip arguments out of ``kwargs``, validated."""
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
  return clips


def with_clips(
  tx: optax.GradientTransformation, clips: dict[str, Any]
) -> optax.GradientTransformation:
  """``tx`` after Keras's clipping of the gradients, in Keras's order."""
  transforms = []
  if "clipvalue" in clips:
    transforms.append(optax.clip(clips["clipvalue"]))
  if "clipnorm" in clips:
    transforms.append(clip_by_leaf_norm(clips["clipnorm"]))
  if "global_clipnorm" in clips:
    transforms.append(optax.clip_by_global_norm(clips["global_clipnorm"]))
  return optax.chain(*transforms, tx) if transforms else tx


def pop_learning_rate(kwargs: dict[str, Any], caller: str, stacklevel: int) -> str:
  """Renames Keras's ``lr`` to ``learning_rate``; returns the name given."""
  if "lr" not in kwargs:
    return "learning_rate"
  if "learning_rate" in kwargs:
    raise TypeError(
      f"`{caller}` got both `lr` and `learning_rate`; pass only `learning_rate`."
    )
  warnings.warn(
    "`lr` is deprecated, use `learning_rate` instead.",
    DeprecationWarning,
    stacklevel=stacklevel + 1,
  )
  kwargs["learning_rate"] = kwargs.pop("lr")
  return "lr"


def warn_learning_rate_decay(decay: Any, stacklevel: int) -> None:
  """Keras's ``decay`` is a learning-rate decay, not the average's."""
  warnings.warn(
    f"`decay`={decay!r} is Keras's legacy learning-rate decay "
    "(`learning_rate / (1 + decay * t)`), as TFA read it, not the decay "
    "of the moving average, which is `average_decay`. Keras 3 removed "
    "`decay`; pass `average_decay=` for the average and a learning-rate "
    "schedule for the optimizer.",
    UserWarning,
    stacklevel=stacklevel + 1,
  )


def check_decay(decay: Any) -> None:
  if not is_real_number(decay):
    raise TypeError(
      f"`decay` must be a non-negative float, got {type(decay).__name__}: {decay!r}."
    )
  if math.isnan(float(decay)) or float(decay) < 0:
    raise ValueError(f"`decay` must be a non-negative float, got {decay!r}.")
