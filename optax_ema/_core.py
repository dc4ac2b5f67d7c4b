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

  With several decays ``average`` is an :class:`optax_ema.Averages` (one
  such tree per decay), and with ``debias=True`` a
  :class:`optax_ema.DebiasedAverage`; read it with
  :func:`optax_ema.averaged_params` in every case.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), average_decay=0.5)
    >>> state = tx.init({"w": jnp.array([2.0])})
    >>> _, state = tx.update({"w": jnp.array([1.0])}, state, {"w": jnp.array([2.0])})
    >>> print(int(state.count), f"{state.average['w'][0]:.2f}")
    1 1.50
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
    if jnp.issubdtype(value.dtype, jnp.bool_):
      raise TypeError(f"`{name}` must be a real number, got the bool {value!r}.")
    if isinstance(value, jax.core.Tracer):
      return  # traced (optax.inject_hyperparams): its value is not known here
    as_float = float(value)
    if math.isnan(as_float) or not 0.0 <= as_float <= 1.0:
      raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
    return
  raise TypeError(
    f"`{name}` must be a float in [0, 1] or a schedule `count -> decay`, got "
    f"{type(value).__name__}: {value!r}."
  )


def check_int(
  value: Any, name: str, minimum: int = 0, allow_none: bool = False
) -> None:
  """Validates an int hyperparameter; traced integer scalars pass through."""
  if value is None and allow_none:
    return
  expected = f"an int >= {minimum}"
  if allow_none:
    expected = f"None or {expected}"
  if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.integer):
    if value.ndim != 0:
      raise ValueError(f"`{name}` must be a scalar, got shape {value.shape}.")
    if not isinstance(value, jax.core.Tracer) and int(value) < minimum:
      raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return  # a traced value (optax.inject_hyperparams) is not known here
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(
      f"`{name}` must be {expected}, got {type(value).__name__}: {value!r}."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


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


def upcast_value(value: Any, compute: Any) -> jax.Array:
  """``value`` in the ``compute`` dtype, holding exactly its own dtype's values.

  A float16/bfloat16 ``value`` (e.g. ``params + updates`` as
  ``optax.apply_updates`` rounds it) is re-rounded to its own grid after the
  upcast with ``lax.reduce_precision``: under ``jit`` XLA may otherwise fuse
  the low-precision arithmetic into float32 and skip the rounding (excess
  precision), and the average would see values training never held.
  """
  value = jnp.asarray(value)
  out = value.astype(compute)
  if (
    jnp.issubdtype(value.dtype, jnp.floating)
    and jnp.issubdtype(jnp.dtype(compute), jnp.floating)
    and jnp.finfo(value.dtype).bits < jnp.finfo(compute).bits
  ):
    info = jnp.finfo(value.dtype)
    out = jax.lax.reduce_precision(
      out, exponent_bits=info.nexp, mantissa_bits=info.nmant
    )
  return out


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
  new = a - (a - upcast_value(value, compute)) * (1 - d)
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

  def leaf(a: Any, v: Any) -> Any:
    if _tree_utils.is_none_or_masked(a):
      return a
    a = jnp.asarray(a)
    if not _tree_utils.is_float(a):
      raise TypeError(
        "`average_var` leaves must be floating point (an integer average "
        f"would truncate), got dtype {a.dtype}."
      )
    return ema_leaf(a, v, decay)

  return jax.tree.map(leaf, average_var, var, is_leaf=_tree_utils.is_none_or_masked)


def _init_average(params: optax.Params, mask: Any, ema_dtype: Any) -> Any:
  def init_leaf(p: Any) -> Any:
    if _tree_utils.is_float(p):
      dtype = _tree_utils.default_ema_dtype(jnp.asarray(p).dtype, ema_dtype)
      return jnp.array(p, dtype=dtype, copy=True)  # explicit: never weak
    if _tree_utils.is_key(p):
      return jax.random.wrap_key_data(
        jnp.array(jax.random.key_data(p), copy=True), impl=jax.random.key_impl(p)
      )
    # An explicit dtype: a Python scalar leaf would otherwise be stored
    # weakly typed and change type (and retrace) after the first update.
    return jnp.array(p, dtype=jnp.asarray(p).dtype, copy=True)

  full_mask = _tree_utils.expand_mask(mask, params)
  return _tree_utils.map_selected(init_leaf, full_mask, params)


def _latest_value(p: Any, u: Any) -> Any:
  """What ``optax.apply_updates`` makes of one leaf; keys and float0 stay put."""
  if u is None or _tree_utils.is_key(p):
    return p
  if getattr(u, "dtype", None) == jax.dtypes.float0:
    return p
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def latest_values(reference: Any, params: Any, updates: Any, sequential: bool) -> Any:
  """The values the averages move towards, leaf by leaf (``None`` where unused).

  ``params + updates`` as ``optax.apply_updates`` forms them (``sequential``)
  or ``params``; ``None`` where ``reference`` holds no average.
  """

  def leaf(a: Any, p: Any, u: Any) -> Any:
    if _tree_utils.is_none_or_masked(a):
      return None
    return _latest_value(p, u) if sequential else p

  return jax.tree.map(
    leaf, reference, params, updates, is_leaf=_tree_utils.is_none_or_masked
  )


def step_leaf(
  average: Any, value: Any, float_step: Callable[[jax.Array, Any], jax.Array]
) -> Any:
  """One leaf of any averaging step of this package.

  ``None`` and masked-out leaves stay as they are; floating point leaves
  become ``float_step(average, value)``; other leaves (ints, bools, PRNG
  keys) are not averaged and take the latest ``value``, in their dtype.
  """
  if _tree_utils.is_none_or_masked(average):
    return average
  if _tree_utils.is_float(average):
    return float_step(average, value)
  if _tree_utils.is_key(average):
    return value
  return jnp.asarray(value).astype(average.dtype)


def new_average(
  average: Any, params: Any, updates: Any, decay: jax.Array, sequential: bool
) -> Any:
  """Advances every leaf of ``average`` by one step towards the parameters."""
  values = latest_values(average, params, updates, sequential)
  return jax.tree.map(
    lambda a, v: step_leaf(a, v, lambda a, v: ema_leaf(a, v, decay)),
    average,
    values,
    is_leaf=_tree_utils.is_none_or_masked,
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


class PerLeafDecay:
  """A pytree prefix of decays: one decay (or schedule) per parameter subtree.

  Build it with :func:`optax_ema.schedules.per_leaf`; it marks a tree of
  decays as per-leaf, as opposed to a tuple or dict of decays, which keeps
  several averages.
  """

  def __init__(self, prefix: Any) -> None:
    self.prefix = prefix

  def __repr__(self) -> str:
    return f"per_leaf({self.prefix!r})"


class DebiasedAverage(NamedTuple):
  """A zero-initialised average and its bias-correction weight (``debias=True``).

  The average of :func:`moving_average` with ``debias=True`` starts at zero;
  ``weight`` is :math:`1 - \\prod_i d_i` over the decays applied so far, so
  the debiased value is ``average / weight`` (what
  :func:`optax_ema.averaged_params` returns).

  Attributes:
    average: the biased average, a tree with the structure of the parameters.
    weight: float32 scalar (for per-leaf decays a float32 vector, one entry
      per array leaf of ``average`` in ``jax.tree.leaves`` order), zero before
      the first update.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=True)
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(type(state.average).__name__, f"{state.average.weight:.1f}")
    DebiasedAverage 0.0
  """

  average: optax.Params
  weight: Any


@jax.tree_util.register_pytree_with_keys_class
class Averages:
  """Several averages of the same parameters, one per decay, in one state.

  What :attr:`MovingAverageState.average` holds when ``average_decay`` is a
  tuple/list (keys ``0, 1, ...``) or a dict (its keys) of decays. It is a
  pytree whose children are the averages (each a tree with the structure of
  the parameters, or a :class:`DebiasedAverage`); the keys and the constant
  decays are static data. Pick one with :func:`optax_ema.averaged_params`
  (``which=`` an index, a key or a decay value) or with ``averages[which]``.

  Attributes:
    averages: a tuple of averages.
    keys: their keys (ints for a tuple of decays, the dict keys otherwise).
    decays: the constant decay of each average, or ``None`` for a schedule.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), {"fast": 0.9, "slow": 0.99})
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(state.average.keys, state.average.decays)
    ('fast', 'slow') (0.9, 0.99)
  """

  def __init__(
    self, averages: Any, keys: tuple[Any, ...], decays: tuple[float | None, ...]
  ) -> None:
    # No validation: JAX rebuilds pytrees with placeholder children.
    self.averages = tuple(averages)
    self.keys = tuple(keys)
    self.decays = tuple(decays)

  def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], Any]:
    def key_of(k: Any) -> Any:
      if isinstance(k, str):
        return jax.tree_util.DictKey(k)
      return jax.tree_util.SequenceKey(k)

    children = [(key_of(k), a) for k, a in zip(self.keys, self.averages, strict=True)]
    return children, (self.keys, self.decays)

  @classmethod
  def tree_unflatten(cls, aux: Any, children: Any) -> Averages:
    return cls(children, *aux)

  def choices(self) -> str:
    """The valid ``which=`` values, in words."""
    parts = []
    for i, (k, d) in enumerate(zip(self.keys, self.decays, strict=True)):
      label = f"decay {d!r}" if d is not None else "a schedule"
      parts.append(f"{i}" if k == i else f"{i} or {k!r}")
      parts[-1] += f" ({label})"
    return ", ".join(parts)

  def index(self, which: Any) -> int:
    """The position of ``which`` (an index, a key or a decay value)."""
    if isinstance(which, str):
      if which in self.keys:
        return self.keys.index(which)
    elif isinstance(which, (int, np.integer)) and not isinstance(which, bool):
      if -len(self.averages) <= int(which) < len(self.averages):
        return int(which) % len(self.averages)
    elif _is_python_number(which) or isinstance(which, np.floating):
      # Compare as float32 values: that is how the decay is applied.
      matches = [
        i
        for i, d in enumerate(self.decays)
        if d is not None and np.float32(d) == np.float32(which)
      ]
      if len(matches) == 1:
        return matches[0]
      if len(matches) > 1:
        raise ValueError(
          f"`which`={which!r} matches {len(matches)} averages with that decay; "
          f"pick one by position or key: {self.choices()}."
        )
    raise ValueError(
      f"`which`={which!r} picks none of the {len(self.averages)} averages in "
      f"this state; choose one of: {self.choices()}."
    )

  def __getitem__(self, which: Any) -> Any:
    return self.averages[self.index(which)]

  def __len__(self) -> int:
    return len(self.averages)

  def __repr__(self) -> str:
    return (
      f"Averages(keys={self.keys!r}, decays={self.decays!r}, "
      f"averages={self.averages!r})"
    )


def params_like_average(average: Any) -> Any:
  """The first tree shaped like the parameters inside a state's ``average``."""
  if isinstance(average, Averages):
    average = average.averages[0]
  if isinstance(average, DebiasedAverage):
    average = average.average
  return average


def debiased_value(average: Any, weight: Any) -> Any:
  """``average / weight`` on float leaves (the average itself where weight is 0)."""

  def leaf(a: Any, w: Any) -> Any:
    if _tree_utils.is_none_or_masked(a) or not _tree_utils.is_float(a):
      return a
    w = jnp.asarray(w, jnp.float32)
    safe = jnp.where(w > 0, w, jnp.ones_like(w))
    compute = jnp.promote_types(a.dtype, jnp.float32)
    return (a.astype(compute) / safe.astype(compute)).astype(a.dtype)

  if jnp.ndim(weight) == 0:
    return jax.tree.map(
      lambda a: leaf(a, weight), average, is_leaf=_tree_utils.is_none_or_masked
    )
  # Per-leaf decays: one weight per array leaf, in `jax.tree.leaves` order.
  leaves, treedef = jax.tree.flatten(average)
  return treedef.unflatten([leaf(a, weight[i]) for i, a in enumerate(leaves)])


def _decay_label(decay: Any) -> float | None:
  if _is_python_number(decay) or (
    isinstance(decay, (np.ndarray, np.generic)) and np.ndim(decay) == 0
  ):
    return float(decay)
  return None


def _check_one_decay(decay: Any, name: str) -> None:
  """Validates one average's decay: a number, a schedule or a per-leaf tree."""
  if isinstance(decay, PerLeafDecay):
    leaves, _ = jax.tree_util.tree_flatten_with_path(decay.prefix)
    if not leaves:
      raise ValueError(f"`{name}` per_leaf tree holds no decay: {decay!r}.")
    for path, leaf in leaves:
      leaf_name = f"{name}{jax.tree_util.keystr(path)}"
      check_decay(leaf, leaf_name)
      if callable(leaf):
        _check_schedule(leaf, leaf_name)
    return
  check_decay(decay, name)
  if callable(decay):
    _check_schedule(decay, name)


def _decay_specs(average_decay: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
  """Splits ``average_decay`` into (decays, keys, several)."""
  if isinstance(average_decay, (tuple, list)) and not isinstance(
    average_decay, PerLeafDecay
  ):
    if not average_decay:
      raise ValueError("`average_decay` is an empty sequence; give at least one.")
    decays = tuple(average_decay)
    keys = tuple(range(len(decays)))
    for i, d in enumerate(decays):
      _check_one_decay(d, f"average_decay[{i}]")
    return decays, keys, True
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
    for k, d in zip(keys, decays, strict=True):
      _check_one_decay(d, f"average_decay[{k!r}]")
    return decays, keys, True
  _check_one_decay(average_decay, "average_decay")
  return (average_decay,), (0,), False


def expand_decay(decay: Any, params: Any) -> Any:
  """A per-leaf decay prefix broadcast to a tree with the params' structure."""
  if not isinstance(decay, PerLeafDecay):
    return decay
  try:
    return jax.tree.map(
      lambda d, sub: jax.tree.map(lambda _: d, sub, is_leaf=_tree_utils.is_none),
      decay.prefix,
      params,
      is_leaf=callable,
    )
  except ValueError as err:
    raise ValueError(
      "`average_decay` per_leaf tree must be a pytree prefix of the params "
      f"(a decay or schedule where a whole subtree shares it): {err}"
    ) from None


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash with good avalanche ("lowbias32", C. Wellons)."""
  x = x ^ (x >> jnp.uint32(16))
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> jnp.uint32(15))
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> jnp.uint32(16))


def rounding_bits(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
  """Pseudo-random uint32 per element: a hash of (seed, flat element index).

  The element index is global (``lax.iota`` over the whole array), so the
  bits, and hence the rounding, are the same on every device and under every
  sharding, and cost a few integer operations per element (against ~20
  rounds of threefry).
  """
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _mix32(index ^ _mix32(jnp.asarray(seed, jnp.uint32)))


def rounding_seed(count: jax.Array, leaf: int, average: int) -> jax.Array:
  """The per-step, per-leaf, per-average seed of :func:`rounding_bits`."""
  c = _mix32(jnp.asarray(count).astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
  return _mix32(c ^ jnp.uint32((leaf * 0x85EBCA6B + average * 0xC2B2AE35) & 0xFFFFFFFF))


def round_stochastic_bf16(x: jax.Array, bits: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` to bfloat16 up or down, unbiased, using ``bits``.

  ``x`` rounds away from zero with probability equal to the dropped fraction
  of its last bfloat16 place (the low 16 bits of ``bits`` are the dither),
  so ``E[result] = x`` for uniform bits. Infinities and NaNs pass through.
  """
  x = x.astype(jnp.float32)
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = bits.astype(jnp.uint32) & jnp.uint32(0xFFFF)
  rounded = (raw + noise) & jnp.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jnp.where(jnp.isfinite(x), out, x.astype(jnp.bfloat16))


class _Config(NamedTuple):
  """The static configuration of one :func:`moving_average` transformation."""

  decays: tuple[Any, ...]
  keys: tuple[Any, ...]
  several: bool
  num_updates: Any
  start_step: Any
  dynamic_decay: bool
  sequential_update: bool
  debias: bool
  update_every: int
  stochastic_rounding: bool

  def step_decay(self, decay: Any, count: jax.Array) -> Any:
    """The decay of one spec at step ``count`` (a tree for per-leaf decays)."""

    def one(d: Any) -> jax.Array:
      return tfa_decay(
        count,
        d,
        num_updates=self.num_updates,
        start_step=self.start_step,
        dynamic_decay=self.dynamic_decay,
      )

    if isinstance(decay, PerLeafDecay):
      return PerLeafDecay(jax.tree.map(one, decay.prefix, is_leaf=callable))
    return one(decay)

  def interval_decay(self, decay: Any, count: jax.Array) -> Any:
    """The decay applied at an averaging step: the product over the interval.

    With ``update_every=k`` the average moves at steps ``count`` with
    ``(count + 1) % k == 0`` by the product of the per-step decays of steps
    ``count - k + 1 .. count``, so the window in steps does not depend on k.
    """
    k = self.update_every
    if k == 1:
      return self.step_decay(decay, count)
    steps = count - (k - 1) + jnp.arange(k, dtype=count.dtype)

    def unwrapped(c: jax.Array) -> Any:
      d = self.step_decay(decay, c)
      return d.prefix if isinstance(d, PerLeafDecay) else d

    prods = jax.tree.map(lambda x: jnp.prod(x, axis=0), jax.vmap(unwrapped)(steps))
    return PerLeafDecay(prods) if isinstance(decay, PerLeafDecay) else prods

  def last_decays(self, count: jax.Array) -> tuple[Any, ...]:
    """Per average: the decay applied at the last averaging step before ``count``.

    0 before any averaging step. Per-leaf decays come back as a
    :class:`PerLeafDecay` of scalars.
    """
    k = self.update_every
    last = (count // k) * k - 1
    out = []
    for d in self.decays:
      value = self.interval_decay(d, jnp.maximum(last, 0).astype(jnp.int32))
      zero = lambda v: jnp.where(last >= 0, v, jnp.zeros_like(v))
      if isinstance(value, PerLeafDecay):
        out.append(PerLeafDecay(jax.tree.map(zero, value.prefix)))
      else:
        out.append(zero(value))
    return tuple(out)


def _init_debiased(average: Any, decay: Any, params: Any) -> DebiasedAverage:
  zeros = jax.tree.map(
    lambda a: (
      jnp.zeros_like(a)
      if not _tree_utils.is_none_or_masked(a) and _tree_utils.is_float(a)
      else a
    ),
    average,
    is_leaf=_tree_utils.is_none_or_masked,
  )
  if isinstance(decay, PerLeafDecay):
    # A vector, one weight per array leaf in `jax.tree.leaves` order: not a
    # params-shaped tree, so that optax.tree_map_params leaves it alone.
    weight = jnp.zeros([len(jax.tree.leaves(average))], jnp.float32)
  else:
    weight = jnp.zeros([], jnp.float32)
  return DebiasedAverage(zeros, weight)


def init_advanced_average(
  config: _Config, params: Any, mask: Any, ema_dtype: Any
) -> Any:
  """The ``average`` field of a state with several, debiased or per-leaf decays."""
  averages = []
  for decay in config.decays:
    if jax.tree.leaves(
      params
    ):  # (optax.tree_map_params inits with a leafless stand-in)
      expand_decay(decay, params)  # a per-leaf prefix that does not fit fails here
    average = _init_average(params, mask, ema_dtype)
    if config.debias:
      average = _init_debiased(average, decay, params)
    averages.append(average)
  if not config.several:
    return averages[0]
  return Averages(averages, config.keys, tuple(_decay_label(d) for d in config.decays))


def _next_weight(weight: jax.Array, decay: Any) -> jax.Array:
  """``1 - prod(decays)`` one step on: the average of a constant 1 from 0.

  Updated with the same rounding as the average itself (``w + (1 - w)(1 -
  d)`` rather than ``1 - (1 - w) d``), so that the debiased average of
  constant parameters is exact to float32 rounding.
  """
  d = jnp.asarray(decay, jnp.float32)
  return weight - (weight - 1.0) * (1.0 - d)


def advanced_new_average(
  config: _Config, average: Any, values: Any, count: jax.Array
) -> Any:
  """One averaging step of every average, in a single pass over the leaves.

  ``values`` is :func:`latest_values` of the step: computing it before (and
  outside) a ``lax.cond`` lets XLA read the new parameters' own buffers
  instead of copying the parameters and updates into the conditional.
  """
  slots = list(average.averages) if config.several else [average]
  trees = [s.average if config.debias else s for s in slots]
  ref_leaves, treedef = jax.tree_util.tree_flatten(
    trees[0], is_leaf=_tree_utils.is_none_or_masked
  )
  value_leaves = treedef.flatten_up_to(values)
  avg_leaves = [treedef.flatten_up_to(t) for t in trees]

  interval = [config.interval_decay(decay, count) for decay in config.decays]
  decays = []
  for d in interval:
    if isinstance(d, PerLeafDecay):
      d = treedef.flatten_up_to(expand_decay(d, values))
    else:
      d = [d] * len(ref_leaves)
    decays.append(d)

  new_leaves: list[list[Any]] = [[] for _ in trees]

  def float_step(a: jax.Array, value: Any, decay: Any, i: int, j: int) -> jax.Array:
    if config.stochastic_rounding and a.dtype == jnp.bfloat16:
      compute = jnp.float32
      af = a.astype(compute)
      df = jnp.asarray(decay).astype(compute)
      exact = af - (af - upcast_value(value, compute)) * (1 - df)
      bits = rounding_bits(exact.shape, rounding_seed(count, i, j))
      return round_stochastic_bf16(exact, bits)
    return ema_leaf(a, value, decay)

  for i, value in enumerate(value_leaves):
    for j in range(len(trees)):
      new_leaves[j].append(
        step_leaf(
          avg_leaves[j][i],
          value,
          lambda a, v, i=i, j=j: float_step(a, v, decays[j][i], i, j),
        )
      )

  out = []
  for j, slot in enumerate(slots):
    tree = treedef.unflatten(new_leaves[j])
    if config.debias:
      d = interval[j]
      if isinstance(d, PerLeafDecay):
        per_array_leaf = [
          jnp.asarray(decays[j][i], jnp.float32)
          for i, a in enumerate(avg_leaves[j])
          if not _tree_utils.is_none_or_masked(a)
        ]
        weight = _next_weight(slot.weight, jnp.stack(per_array_leaf))
      else:
        weight = _next_weight(slot.weight, d)
      tree = DebiasedAverage(tree, weight)
    out.append(tree)
  if not config.several:
    return out[0]
  return Averages(out, average.keys, average.decays)


class MovingAverageTransformation(optax.GradientTransformationExtraArgs):
  """What :func:`moving_average` returns: an optax transformation.

  A plain ``optax.GradientTransformationExtraArgs`` (``init``, ``update``)
  that also remembers its static averaging configuration, so that
  :func:`optax_ema.diagnostics` can report the decay it used.
  """


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
  debias: bool = False,
  update_every: int | None = None,
  stochastic_rounding: bool = False,
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

  Beyond TFA (all off by default): several averages at once, per-leaf
  decays, zero-debiasing, averaging only every k-th step, and stochastically
  rounded bfloat16 storage; see the arguments below and
  :mod:`optax_ema.schedules` for decay schedules.

  Args:
    optimizer: the optax transformation to wrap, or the name of an optax
      optimizer (``"sgd"``, ``"adam"``, ...), built with
      ``optax.inject_hyperparams`` so that its learning rate lives in the
      state (Keras's default learning rate when none is given).
    average_decay: a float in [0, 1] or a schedule ``count -> decay`` (e.g.
      from :mod:`optax_ema.schedules`); or
      :func:`optax_ema.schedules.per_leaf` of a pytree prefix of those (one
      decay per parameter subtree); or a tuple/list or a dict of any of
      these, which keeps one average per entry, updated in the same pass
      (the state's ``average`` is then an :class:`optax_ema.Averages`; pick
      one with ``averaged_params(..., which=...)``).
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
    skip_nonfinite: if True, a step whose incoming gradients or new average
      hold a NaN or an infinity leaves the average and the count untouched
      (the inner optimizer's update is still returned as it is; e.g. inside
      ``optax.apply_if_finite`` the skipped step does not tick the average).
    debias: if True, the average starts at zero and is read through the
      bias correction ``average / (1 - prod(decays so far))`` (exact under
      schedules: the state keeps the running product in a
      :class:`optax_ema.DebiasedAverage`); :func:`optax_ema.averaged_params`
      applies it.
    update_every: ``None`` (every step) or a positive int ``k``: move the
      average only at steps ``t`` with
      ``(t + 1) % update_every == 0``, by the product of the decays of the
      ``update_every`` steps since the last move (``decay ** k`` for a
      constant decay), so the averaging window in steps does not change;
      the other steps do not touch the average (a ``lax.cond``).
    stochastic_rounding: with ``ema_dtype=jnp.bfloat16``, round each new
      average to bfloat16 up or down at random, unbiased, with bits that are
      a fixed function of the step and the leaf (identical on every device),
      instead of to nearest: half the memory of a float32 average, and it
      keeps moving where nearest rounding gets stuck.
    **optimizer_kwargs: Keras's ``clipnorm`` / ``clipvalue`` /
      ``global_clipnorm`` (applied before the optimizer); for an optimizer
      given by name also ``learning_rate`` (or the deprecated ``lr``),
      ``decay`` (inverse-time learning-rate decay) and the optimizer's own
      arguments. Any other keyword is a TypeError. ``mask`` is always the
      average's mask, never the optimizer's (build ``optax.adamw(...,
      mask=...)`` yourself for that).

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
  # The decay(s) are validated before the other arguments.
  decays, keys, several = _decay_specs(average_decay)
  for name, value in (
    ("sequential_update", sequential_update),
    ("dynamic_decay", dynamic_decay),
    ("skip_nonfinite", skip_nonfinite),
  ):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(
        f"`{name}` must be a bool, got {type(value).__name__}: {value!r}."
      )
  check_int(num_updates, "num_updates", allow_none=True)
  check_int(start_step, "start_step")
  _check_ema_dtype(ema_dtype)
  if isinstance(mask, (str, bytes)):
    raise TypeError(f"`mask` must be a pytree of bools or a callable, got {mask!r}.")
  for name, value in (("debias", debias), ("stochastic_rounding", stochastic_rounding)):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(
        f"`{name}` must be a bool, got {type(value).__name__}: {value!r}."
      )
  if update_every is None:
    update_every = 1
  elif isinstance(update_every, jax.Array) and not isinstance(
    update_every, jax.core.Tracer
  ):
    update_every = int(update_every) if update_every.ndim == 0 else update_every
  if isinstance(update_every, jax.core.Tracer):
    raise TypeError(
      "`update_every` must be a static Python int (it shapes the compiled "
      "step); under optax.inject_hyperparams pass "
      "`static_args=('update_every',)`."
    )
  if isinstance(update_every, (bool, np.bool_)) or not isinstance(
    update_every, (int, np.integer)
  ):
    raise TypeError(
      f"`update_every` must be a positive int, got {type(update_every).__name__}: "
      f"{update_every!r}."
    )
  if update_every < 1:
    raise ValueError(f"`update_every` must be a positive int, got {update_every!r}.")
  if stochastic_rounding and (
    ema_dtype is None or jnp.dtype(ema_dtype) != jnp.dtype(jnp.bfloat16)
  ):
    raise ValueError(
      "`stochastic_rounding=True` needs `ema_dtype=jnp.bfloat16` (it rounds "
      f"the float32 result to bfloat16), got `ema_dtype`={ema_dtype!r}."
    )

  config = _Config(
    decays=decays,
    keys=keys,
    several=several,
    num_updates=num_updates,
    start_step=start_step,
    dynamic_decay=bool(dynamic_decay),
    sequential_update=bool(sequential_update),
    debias=bool(debias),
    update_every=int(update_every),
    stochastic_rounding=bool(stochastic_rounding),
  )
  # The TFA path (one constant decay or schedule, none of the extras) keeps
  # the plain average tree; anything else goes through the general pass.
  advanced = (
    several
    or isinstance(decays[0], PerLeafDecay)
    or debias
    or update_every != 1
    or stochastic_rounding
  )

  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> MovingAverageState:
    if advanced:
      average = init_advanced_average(config, params, mask, ema_dtype)
    else:
      average = _init_average(params, mask, ema_dtype)
    return MovingAverageState(
      inner_state=inner.init(params),
      average=average,
      count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: optax.Updates,
    state: MovingAverageState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, MovingAverageState]:
    reference = params_like_average(state.average) if advanced else state.average
    _tree_utils.check_update_args("moving_average", reference, params, updates)
    new_updates, inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    if not advanced:
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
    else:
      values = latest_values(reference, params, new_updates, config.sequential_update)
      if config.update_every == 1:
        average = advanced_new_average(config, state.average, values, state.count)
      else:
        # Skipped steps take the identity branch: no average memory is read
        # or written (the conditional's output aliases its operand). Only
        # the new parameters go in, already formed: passing params and
        # updates instead made XLA copy both into the conditional (2x the
        # parameter bytes of temporaries, 10x slower on CPU).
        average = jax.lax.cond(
          (state.count + 1) % config.update_every == 0,
          lambda a, v, c: advanced_new_average(config, a, v, c),
          lambda a, v, c: a,
          state.average,
          values,
          state.count,
        )
    count = optax.safe_increment(state.count)
    if skip_nonfinite:
      ok = all_finite(updates) & all_finite(average)
      average = optax.tree.where(ok, average, state.average)
      count = jnp.where(ok, count, state.count)
    return new_updates, MovingAverageState(inner_state, average, count)

  tx = MovingAverageTransformation(init_fn, update_fn)
  tx.averaging_config = config  # read by optax_ema.diagnostics
  return tx
