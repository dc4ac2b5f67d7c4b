"""Stochastic weight averaging: TFA's ``SWA`` as an Optax transform."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ema import _averaged
from optax_ema import _core
from optax_ema import _optimizers
from optax_ema import _tree_utils


class SWAState(NamedTuple):
  """State of :func:`swa`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    average: the running average of the snapshots, a tree with the structure
      of the parameters (float32 for float16/bfloat16 parameters, the
      parameters' dtype for other floats). Until the first snapshot it follows
      the parameters, so that :func:`optax_ema.averaged_params` returns the
      current parameters. Non-float leaves hold the latest parameter value;
      ``None`` leaves stay ``None``.
    count: int32 scalar, the number of updates applied so far (saturating).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.swa(optax.sgd(1.0), start_averaging=2, average_period=5)
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(type(state).__name__, int(state.count), state.average["w"])
    SWAState 0 [1. 1.]
  """

  inner_state: optax.OptState
  average: optax.Params
  count: jax.Array


def swa_schedule(
  count: jax.Array, start_averaging: int, average_period: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(before_start, is_snapshot, k)`` for the update applied at ``count``.

  ``before_start``: ``count < start_averaging``; ``is_snapshot``: the update
  takes a snapshot; ``k``: the number of snapshots already in the average.
  """
  since = jnp.asarray(count, jnp.int32) - start_averaging
  before_start = since < 0
  since = jnp.maximum(since, 0)
  is_snapshot = jnp.logical_and(~before_start, since % average_period == 0)
  return before_start, is_snapshot, since // average_period


def swa_leaf(
  average: jax.Array,
  value: jax.Array,
  before_start: jax.Array,
  is_snapshot: jax.Array,
  k: jax.Array,
) -> jax.Array:
  """One SWA step of one floating point leaf, in the average's dtype.

  Before the start the average copies ``value``; at a snapshot it becomes
  ``(average * k + value) / (k + 1)``; otherwise it stays. The arithmetic
  runs in at least float32.
  """
  dtype = average.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  a = average.astype(compute)
  v = _core.upcast_value(value, compute)
  kf = k.astype(compute)
  snapshot = (a * kf + v) / (kf + 1)
  new = jnp.where(before_start, v, jnp.where(is_snapshot, snapshot, a))
  return new.astype(dtype)


def swa_average_op(
  var: Any,
  average_var: Any,
  count: jax.typing.ArrayLike,
  start_averaging: int,
  average_period: int,
) -> Any:
  """The SWA average after an update at step ``count`` (leaf or pytree)."""
  before_start, is_snapshot, k = swa_schedule(count, start_averaging, average_period)
  _tree_utils.check_like(average_var, var, "var", "`average_var`")

  def leaf(a: Any, v: Any) -> Any:
    if not _tree_utils.is_none_or_masked(a):
      a = jnp.asarray(a)
    return _core.step_leaf(
      a, v, lambda a, v: swa_leaf(a, v, before_start, is_snapshot, k)
    )

  return jax.tree.map(leaf, average_var, var, is_leaf=_tree_utils.is_none_or_masked)


def swa(
  optimizer: optax.GradientTransformation | str,
  start_averaging: int = 0,
  average_period: int = 10,
  **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer to keep a stochastic weight average of the params.

  A port of TensorFlow Addons' ``tfa.optimizers.SWA`` (Izmailov et al.,
  2018). The wrapped optimizer's updates are returned unchanged. With
  :math:`t` the number of updates applied before this one, :math:`s` =
  ``start_averaging``, :math:`P` = ``average_period`` and :math:`x` the
  parameters after this update, the update at :math:`t \\ge s` with
  :math:`(t - s) \\bmod P = 0` takes a snapshot:

  .. math::

    k = (t - s) / P, \\qquad \\bar{x} \\leftarrow \\frac{k\\,\\bar{x} + x}{k + 1}

  and other updates leave :math:`\\bar{x}` unchanged. Before the first
  snapshot the average follows the parameters, so that
  :func:`optax_ema.averaged_params` returns the current parameters (TFA's
  average started at zeros and ``assign_average_vars`` wrote those zeros into
  the model). Read the average with :func:`optax_ema.averaged_params`.

  Args:
    optimizer: the optax transformation to wrap, or the name of an optax
      optimizer (``"sgd"``, ``"adam"``, ...; see
      :func:`optax_ema.moving_average`).
    start_averaging: the number of updates before the first snapshot.
    average_period: take a snapshot every this many updates (>= 1).
      Both may be int32 scalars traced by ``optax.inject_hyperparams``.
    **optimizer_kwargs: for an optimizer given by name, its arguments
      (``learning_rate``, ``momentum``, ...) and Keras's ``lr`` / ``decay``;
      for any optimizer, Keras's ``clipnorm``, ``clipvalue`` or
      ``global_clipnorm``, applied to the gradients before the optimizer.

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
    >>> tx = optax_ema.swa(optax.sgd(1.0), start_averaging=0, average_period=1)
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
  optimizer = _optimizers.resolve_optimizer(optimizer, optimizer_kwargs, "swa")
  _core.check_int(start_averaging, "start_averaging", 0)
  _core.check_int(average_period, "average_period", 1)
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> SWAState:
    return SWAState(
      inner_state=inner.init(params),
      average=_core._init_average(params, None, None),
      count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: optax.Updates,
    state: SWAState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, SWAState]:
    _tree_utils.check_update_args("swa", state.average, params, updates)
    new_updates, inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    before_start, is_snapshot, k = swa_schedule(
      state.count, start_averaging, average_period
    )

    values = _core.latest_values(state.average, params, new_updates, True)
    average = jax.tree.map(
      lambda a, v: _core.step_leaf(
        a, v, lambda a, v: swa_leaf(a, v, before_start, is_snapshot, k)
      ),
      state.average,
      values,
      is_leaf=_tree_utils.is_none_or_masked,
    )
    return new_updates, SWAState(
      inner_state, average, optax.safe_increment(state.count)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _read_swa(state: SWAState, which: Any) -> Any:
  if which is not None:
    raise ValueError(
      f"`which` must be None for a state with a single average, got {which!r}."
    )
  return state.average


_averaged.register_average_state(SWAState, _read_swa)
