"""The moving-average wrapper: TFA's ``MovingAverage`` as an Optax transform."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _optimizers
from optax_ema import _tree_utils

DecayLike = float | jax.typing.ArrayLike | Callable[[jax.Array], jax.typing.ArrayLike]


class MovingAverageState(NamedTuple):
  """State of :func:`moving_average`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    average: the moving average of the parameters, a tree with the structure
      of the parameters. Floating point leaves hold the average (in float32
      for float16/bfloat16 parameters unless ``ema_dtype`` says otherwise);
      non-float leaves hold the latest parameter value; masked-out leaves are
      ``optax.MaskedNode()`` and ``None`` leaves stay ``None``.
    count: int32 scalar, the number of updates applied so far (saturating).
  """

  inner_state: optax.OptState
  average: optax.Params
  count: jax.Array


def _is_python_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_decay(value: Any, name: str = "average_decay") -> None:
  """Validates a concrete decay; schedules and traced values pass through."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(
      f"`{name}` must be a float in [0, 1] or a schedule, got the bool "
      f"{value!r} (is an old positional `sequential_update` in its place? "
      "pass the other arguments by keyword)."
    )
  if callable(value):
    return
  if _is_python_number(value) or (
    isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0
  ):
    if isinstance(value, (np.ndarray, np.generic)) and not np.issubdtype(
      np.asarray(value).dtype, np.number
    ):
      raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    as_float = float(value)
    if math.isnan(as_float) or not 0.0 <= as_float <= 1.0:
      raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
    return
  if isinstance(value, jax.Array):
    if value.ndim != 0:
      raise ValueError(
        f"`{name}` must be a scalar, got an array of shape {value.shape}."
      )
    return  # possibly traced (optax.inject_hyperparams): checked by the caller
  raise TypeError(
    f"`{name}` must be a float in [0, 1] or a schedule `count -> decay`, got "
    f"{type(value).__name__}: {value!r}."
  )


def _check_count_arg(value: Any, name: str, allow_none: bool) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a non-negative int, got the bool {value!r}.")
  if isinstance(value, (int, np.integer)):
    if value < 0:
      raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
    return
  if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.integer):
    return  # e.g. traced by optax.inject_hyperparams
  expected = "None or a non-negative int" if allow_none else "a non-negative int"
  raise TypeError(
    f"`{name}` must be {expected}, got {type(value).__name__}: {value!r}."
  )


def _check_ema_dtype(ema_dtype: Any) -> None:
  if ema_dtype is None:
    return
  try:
    dtype = jnp.dtype(ema_dtype)
  except TypeError:
    raise TypeError(
      f"`ema_dtype` must be None or a floating point dtype, got {ema_dtype!r}."
    ) from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`ema_dtype` must be a floating point dtype, got {dtype.name}.")


def _check_schedule(schedule: Callable[..., Any], name: str) -> None:
  """Checks, without running it, that a schedule maps a count to a scalar."""
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


def tfa_decay(
  count: jax.Array,
  average_decay: DecayLike,
  *,
  num_updates: jax.typing.ArrayLike | None = None,
  start_step: jax.typing.ArrayLike = 0,
  dynamic_decay: bool = False,
) -> jax.Array:
  """The decay TFA's ``MovingAverage`` uses at step ``count``, as float32."""
  count = jnp.asarray(count)
  if callable(average_decay):
    decay = jnp.asarray(average_decay(count), jnp.float32)
  else:
    decay = jnp.asarray(average_decay, jnp.float32)
  if num_updates is not None:
    n = jnp.asarray(num_updates, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  step = count.astype(jnp.float32)
  start = jnp.asarray(start_step, jnp.float32)
  if dynamic_decay:
    since = step - start
    decay = jnp.minimum(decay, (1.0 + since) / (10.0 + since))
  if not (isinstance(start_step, int) and start_step == 0):
    decay = jnp.where(step < start, jnp.zeros_like(decay), decay)
  return decay


def ema_leaf(average: jax.Array, value: jax.Array, decay: jax.Array) -> jax.Array:
  """One EMA step of one leaf, in the average's dtype.

  Computes ``average - (average - value) * (1 - decay)`` in at least float32
  (so a low-precision accumulator loses nothing to the arithmetic itself) and
  stores the result in ``average.dtype``.
  """
  dtype = average.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  a = average.astype(compute)
  d = jnp.asarray(decay).astype(compute)
  new = a - (a - jnp.asarray(value).astype(compute)) * (1 - d)
  return new.astype(dtype)


def average_op(
  var: optax.Params, average_var: optax.Params, decay: jax.typing.ArrayLike
) -> optax.Params:
  """One exponential-moving-average step: TFA's ``MovingAverage.average_op``.

  Returns ``average_var - (average_var - var) * (1 - decay)`` for a single
  array or, leaf by leaf, for a pytree. The result has the dtypes of
  ``average_var``; the arithmetic runs in at least float32.

  .. math::

    \\bar{x}_{t+1} = \\bar{x}_t - (1 - d)\\,(\\bar{x}_t - x_{t+1})

  Args:
    var: the new value(s), a leaf or a pytree.
    average_var: the current average, with the structure of ``var``.
    decay: a scalar in [0, 1]; 0 copies ``var``, 1 keeps ``average_var``.

  Returns:
    The new average, with the structure and dtypes of ``average_var``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_ema
    >>> new = optax_ema.average_op(jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]), 0.9)
    >>> print([f"{x:.2f}" for x in new])
    ['0.90', '1.10']
  """
  check_decay(decay, "decay")
  _tree_utils.check_like(average_var, var, "var", "`average_var`")
  return jax.tree.map(
    lambda a, v: a if _tree_utils.is_none_or_masked(a) else ema_leaf(a, v, decay),
    average_var,
    var,
    is_leaf=_tree_utils.is_none_or_masked,
  )


def _init_average(params: optax.Params, mask: Any, ema_dtype: Any) -> Any:
  def init_leaf(p: Any) -> Any:
    if _tree_utils.is_float(p):
      dtype = _tree_utils.default_ema_dtype(jnp.asarray(p).dtype, ema_dtype)
      return jnp.array(p, dtype=dtype, copy=True)
    if _tree_utils.is_key(p):
      return jax.random.wrap_key_data(
        jnp.array(jax.random.key_data(p), copy=True), impl=jax.random.key_impl(p)
      )
    return jnp.array(p, copy=True)

  full_mask = _tree_utils.expand_mask(mask, params)
  return _tree_utils.map_selected(init_leaf, full_mask, params)


def _latest_value(p: Any, u: Any) -> Any:
  """What ``optax.apply_updates`` makes of one leaf; keys and float0 stay put."""
  if u is None or _tree_utils.is_key(p):
    return p
  if getattr(u, "dtype", None) == jax.dtypes.float0:
    return p
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def new_average(
  average: Any, params: Any, updates: Any, decay: jax.Array, sequential: bool
) -> Any:
  """Advances every leaf of ``average`` by one step towards the parameters."""

  def leaf(a: Any, p: Any, u: Any) -> Any:
    if _tree_utils.is_none_or_masked(a):
      return a
    value = _latest_value(p, u) if sequential else p
    if _tree_utils.is_float(a):
      return ema_leaf(a, value, decay)
    return jnp.asarray(value).astype(a.dtype) if not _tree_utils.is_key(a) else value

  return jax.tree.map(
    leaf, average, params, updates, is_leaf=_tree_utils.is_none_or_masked
  )


def all_finite(tree: Any) -> jax.Array:
  """A scalar bool: every floating point leaf of ``tree`` is finite."""
  flags = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree, is_leaf=_tree_utils.is_none_or_masked)
    if not _tree_utils.is_none_or_masked(x) and _tree_utils.is_float(x)
  ]
  if not flags:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(flags))


def moving_average(
  optimizer: optax.GradientTransformation,
  average_decay: DecayLike = 0.99,
  *,
  sequential_update: bool = True,
  num_updates: int | None = None,
  start_step: int = 0,
  dynamic_decay: bool = False,
  ema_dtype: jax.typing.DTypeLike | None = None,
  mask: Any = None,
  skip_nonfinite: bool = False,
  **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer to keep an exponential moving average of the params.

  A port of TensorFlow Addons' ``tfa.optimizers.MovingAverage``. The wrapped
  optimizer's updates are returned unchanged (wrapping never changes
  training); after each update the state also holds

  .. math::

    \\bar{x}_{t+1} = \\bar{x}_t - (1 - d_t)\\,(\\bar{x}_t - x)

  where :math:`x` is the parameters after the update (``sequential_update=True``,
  TFA's default) or before it (``False``), and, with :math:`t` the number of
  updates applied before this one,

  - :math:`D = \\min(\\text{average\\_decay}, \\frac{1 + n}{10 + n})` when
    ``num_updates=n`` is given, else ``average_decay`` (or its value at
    :math:`t` when it is a schedule);
  - :math:`d_t = 0` for :math:`t <` ``start_step`` (the average copies the
    parameters);
  - :math:`d_t = \\min(D, \\frac{1 + t - s}{10 + t - s})` with ``dynamic_decay``,
    where :math:`s` is ``start_step``;
  - :math:`d_t = D` otherwise.

  The decay is computed in float32, as TFA does. Read the average with
  :func:`optax_ema.averaged_params`.

  Args:
    optimizer: the optax transformation to wrap.
    average_decay: a float in [0, 1] or a schedule ``count -> decay``.
    sequential_update: average the parameters after this step's update
      (True, TFA's default) or before it (False; TFA computed the two "at the
      same time", a race it left unspecified, and this is the deterministic
      reading of it).
    num_updates: an optional non-negative int; clamps the decay once to
      ``min(average_decay, (1 + num_updates) / (10 + num_updates))``.
    start_step: before this many updates, the average copies the parameters.
    dynamic_decay: ramp the decay up as ``(1 + t) / (10 + t)`` from
      ``start_step`` (the first averaged step uses 0.1).
    ema_dtype: accumulator dtype for floating point leaves. ``None`` keeps
      float32/float64 leaves in their own dtype and accumulates float16 and
      bfloat16 leaves in float32.
    mask: optional pytree prefix of bools, or a callable of params returning
      one; leaves marked ``False`` are not averaged and cost no memory (they
      are stored as ``optax.MaskedNode()``).
    skip_nonfinite: if True, an update whose new parameters hold a NaN or an
      infinity leaves the average and the count untouched (the inner
      optimizer's update is still returned as it is).
    **optimizer_kwargs: reserved for optimizers given by name; any keyword
      argument is an error for now.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`MovingAverageState`. ``update`` requires ``params`` and forwards
    any extra keyword arguments to ``optimizer``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5)
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = {"w": jnp.array([0.1, 0.1])}
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print([f"{x:.2f}" for x in params["w"]])
    ['0.60', '1.60']
    >>> print([f"{x:.2f}" for x in optax_ema.averaged_params(state)["w"]])
    ['0.75', '1.75']

  References:
    TensorFlow Addons, ``tfa.optimizers.MovingAverage`` (r0.7 - 0.23).
    Polyak & Juditsky, "Acceleration of Stochastic Approximation by
    Averaging", SIAM J. Control Optim. 30(4), 1992.

  .. warning::
    With float16/bfloat16 parameters, keep the default float32 accumulator: a
    bfloat16 average with decay 0.999 rounds every step back to where it was.
  """
  optimizer = _optimizers.resolve_optimizer(
    optimizer, optimizer_kwargs, "moving_average"
  )
  check_decay(average_decay)
  if callable(average_decay):
    _check_schedule(average_decay, "average_decay")
  for name, value in (
    ("sequential_update", sequential_update),
    ("dynamic_decay", dynamic_decay),
    ("skip_nonfinite", skip_nonfinite),
  ):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(
        f"`{name}` must be a bool, got {type(value).__name__}: {value!r}."
      )
  _check_count_arg(num_updates, "num_updates", allow_none=True)
  _check_count_arg(start_step, "start_step", allow_none=False)
  _check_ema_dtype(ema_dtype)
  if mask is not None and not callable(mask) and isinstance(mask, (str, bytes)):
    raise TypeError(f"`mask` must be a pytree of bools or a callable, got {mask!r}.")

  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> MovingAverageState:
    return MovingAverageState(
      inner_state=inner.init(params),
      average=_init_average(params, mask, ema_dtype),
      count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: optax.Updates,
    state: MovingAverageState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, MovingAverageState]:
    if params is None:
      raise ValueError(
        "moving_average needs the current parameters: call "
        "`tx.update(grads, state, params)`."
      )
    _tree_utils.check_like(
      state.average, params, "params", "the parameters the state was initialised with"
    )
    _tree_utils.check_like(
      state.average, updates, "updates", "the parameters the state was initialised with"
    )
    new_updates, inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    decay = tfa_decay(
      state.count,
      average_decay,
      num_updates=num_updates,
      start_step=start_step,
      dynamic_decay=bool(dynamic_decay),
    )
    average = new_average(
      state.average, params, new_updates, decay, bool(sequential_update)
    )
    count = optax.safe_increment(state.count)
    if skip_nonfinite:
      ok = all_finite(average)
      average = optax.tree.where(ok, average, state.average)
      count = jnp.where(ok, count, state.count)
    return new_updates, MovingAverageState(inner_state, average, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
