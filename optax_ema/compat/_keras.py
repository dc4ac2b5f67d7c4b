"""Keras's optimizer arguments, in optax terms.

Keras's default learning rates, its spellings of the aliases' arguments, its
gradient clipping (``clipnorm`` per leaf, ``clipvalue``, ``global_clipnorm``,
applied before the optimizer) and its legacy inverse-time learning-rate
``decay``, as TensorFlow Addons' optimizers understood them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ema import _validation

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
  _validation.check_clips(clips)
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


def pop_learning_rate(kwargs: dict[str, Any], caller: str) -> str:
  """Renames Keras's ``lr`` to ``learning_rate``; returns the name given."""
  if "lr" not in kwargs:
    return "learning_rate"
  _validation.check_lr_alias(kwargs, caller)
  kwargs["learning_rate"] = kwargs.pop("lr")
  return "lr"
