"""One exponential-moving-average step on a tree: TFA's ``average_op``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _engine
from optax_ema import _rules
from optax_ema import _tree_utils
from optax_ema import _validation


def average_op(
  var: optax.Params, average_var: optax.Params, decay: jax.typing.ArrayLike
) -> optax.Params:
  """One exponential-moving-average step: TFA's ``MovingAverage.average_op``.

  Returns ``average_var - (average_var - var) * (1 - decay)`` for a single
  array or, leaf by leaf, for a pytree. The result has the dtypes of
  ``average_var``; the arithmetic runs in at least float32, as every
  average of the package does.

  .. math::

    \\bar{x}_{t+1} = \\bar{x}_t - (1 - d)\\,(\\bar{x}_t - x_{t+1})

  Args:
    var: the new value(s), a leaf or a pytree.
    average_var: the current average, with the structure of ``var``.
    decay: a scalar in [0, 1]; 0 copies ``var``, 1 keeps ``average_var``.
      A number outside [0, 1] or NaN is an error; a traced one (under
      ``jit``) cannot be checked before the step, so there it returns
      ``average_var`` unchanged, as the averaging transforms do on a step
      whose decay is out of range.

  Returns:
    The new average, with the structure and dtypes of ``average_var``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_ema
    >>> average, params = jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0])
    >>> new = optax_ema.average_op(average, params, 0.9)
    >>> print([f"{x:.2f}" for x in new])
    ['0.90', '1.10']
  """
  _validation.check_decay(decay, "decay")
  _tree_utils.check_like(average_var, var, "var", "`average_var`")
  _validation.check_float_average(average_var)
  d = jnp.asarray(decay, jnp.float32)
  step = _rules.StepSize(d)
  # A traced decay cannot be checked here: outside [0, 1] or NaN, the
  # average stays as it is (the transforms' rule), a select per leaf.
  keep = (d >= 0.0) & (d <= 1.0) if _tree_utils.is_traced(decay) else None

  def leaf(a: Any, v: Any) -> Any:
    if _tree_utils.is_none_or_masked(a):
      return a
    return _engine.step_leaf(jnp.asarray(a), v, step, keep=keep)

  return jax.tree.map(leaf, average_var, var, is_leaf=_tree_utils.is_none_or_masked)
