"""Stochastic weight averaging: TFA's ``SWA`` as an Optax transform."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _engine
from optax_ema import _rules
from optax_ema import _states
from optax_ema import _transform
from optax_ema import _tree_utils
from optax_ema import _validation
from optax_ema._states import SWAState as SWAState


def swa_average_op(
  var: Any,
  average_var: Any,
  count: jax.typing.ArrayLike,
  start_averaging: int,
  average_period: int,
) -> Any:
  """The SWA average after an update at step ``count`` (leaf or pytree)."""
  rule = _rules.RunningMean(start_averaging, average_period)
  count = jnp.asarray(count, jnp.int32)
  step, move = rule.step(count), rule.gate(count)
  _tree_utils.check_like(average_var, var, "var", "`average_var`")

  def leaf(a: Any, v: Any) -> Any:
    if _tree_utils.is_none_or_masked(a):
      return a
    a = jnp.asarray(a)
    if not _tree_utils.is_float(a):  # not averaged: the latest value
      return v if _tree_utils.is_key(a) else jnp.asarray(v).astype(a.dtype)
    return jnp.where(move, _engine.step_leaf(a, v, step), a)

  return jax.tree.map(leaf, average_var, var, is_leaf=_tree_utils.is_none_or_masked)


def swa(
  optimizer: optax.GradientTransformation,
  start_averaging: int = 0,
  average_period: int = 10,
  *,
  offload: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer to keep a stochastic weight average of the params.

  A port of TensorFlow Addons' ``tfa.optimizers.SWA`` (Izmailov et al.,
  2018). The wrapped optimizer's updates are returned unchanged. With
  :math:`t` the number of updates applied before this one, :math:`s` =
  ``start_averaging``, :math:`P` = ``average_period`` and :math:`x` the
  parameters after this update, the update at :math:`t \\ge s` with
  :math:`(t - s) \\bmod P = 0` takes a snapshot:

  .. math::

    k = (t - s) / P, \\qquad
    \\bar{x} \\leftarrow \\bar{x} - \\frac{\\bar{x} - x}{k + 1}
      = \\frac{k\\,\\bar{x} + x}{k + 1}

  and other updates leave :math:`\\bar{x}` unchanged (they do not touch it:
  a ``lax.cond``, on GPU and TPU a ``while`` loop). Before the first snapshot the
  average follows the parameters, so that :func:`optax_ema.averaged_params`
  returns the current parameters (TFA's average started at zeros and
  ``assign_average_vars`` wrote those zeros into the model). As for every
  wrapper of the package, :math:`t` counts the updates the wrapped optimizer
  applies. Read the average with :func:`optax_ema.averaged_params`.

  Args:
    optimizer: the optax transformation to wrap.
    start_averaging: the number of updates before the first snapshot.
    average_period: take a snapshot every this many updates (>= 1).
      Both may be int32 scalars traced by ``optax.inject_hyperparams``.
    offload: keep the floating-point averages in host memory, as
      :func:`optax_ema.moving_average` does with ``offload=True``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SWAState`. ``update`` requires ``params``.

  Raises:
    ValueError: ``start_averaging < 0`` or ``average_period < 1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = optax_ema.swa(
    ...   optax.sgd(1.0), start_averaging=0, average_period=1
    ... )
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = {"w": jnp.array([0.1, 0.1])}
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print([f"{x:.2f}" for x in params["w"]])
    ['0.70', '1.70']
    >>> print([f"{x:.2f}" for x in optax_ema.averaged_params(state)["w"]])
    ['0.80', '1.80']

  References:
    Izmailov, Podoprikhin, Garipov, Vetrov & Wilson, "Averaging Weights Leads
    to Wider Optima and Better Generalization", UAI 2018.
    TensorFlow Addons, ``tfa.optimizers.SWA``.

  .. note::
    Unlike TFA, float64 parameters work (the average keeps their dtype), and
    float16/bfloat16 parameters are averaged in float32.
  """
  _validation.check_int(start_averaging, "start_averaging", 0)
  _validation.check_int(average_period, "average_period", 1)
  storage = _validation.check_storage(None, None, offload)
  optimizer = _validation.checked_optimizer(
    optimizer, "swa", "optax_ema.swa(optax.adam(1e-3))"
  )
  engine = _engine.Engine(
    slots=(_engine.Slot(_rules.RunningMean(start_averaging, average_period)),),
    storage=storage,
  )
  layout = _states.SWALayout()
  return _transform.averaging_transformation(optimizer, engine, layout, "swa")
