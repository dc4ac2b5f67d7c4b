"""Power-function EMA (Karras et al., EDM2): several profiles in one pass."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _averaged
from optax_ema import _core
from optax_ema import _optimizers
from optax_ema import _power_math
from optax_ema import _tree_utils


class PowerEmaState(NamedTuple):
  """State of :func:`power_ema`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    averages: a dict from ``repr(sigma_rel)`` (e.g. ``"0.05"``) to that
      profile's average, a tree with the structure of the parameters (float
      leaves in float32 for float16/bfloat16 parameters unless ``ema_dtype``
      says otherwise; non-float leaves hold the latest value; masked-out
      leaves are ``optax.MaskedNode()``; ``None`` leaves stay ``None``). The
      keys are static, so the state traces under ``jax.jit`` as usual.
    count: int32 scalar, the number of updates applied so far (saturating);
      the averages cover updates ``1 .. count``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> print(type(state).__name__, sorted(state.averages))
    PowerEmaState ['0.05', '0.1']
    >>> for _ in range(4):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(int(state.count), f"{state.averages['0.1']['w'][0]:.4f}")
    4 3.8940
  """

  inner_state: optax.OptState
  averages: dict[str, optax.Params]
  count: jax.Array


def sigma_rel_key(sigma_rel: float) -> str:
  """The key of a profile in :attr:`PowerEmaState.averages`."""
  return repr(float(sigma_rel))


def tracked_sigma_rels(state: PowerEmaState) -> list[float]:
  """The sigma_rel values a state tracks, in increasing order."""
  return sorted(float(k) for k in state.averages)


def _check_sigma_rels(sigma_rels: Any) -> tuple[float, ...]:
  if isinstance(sigma_rels, numbers.Real) and not isinstance(sigma_rels, bool):
    sigma_rels = (sigma_rels,)
  if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
    raise TypeError(
      "`sigma_rels` must be a sequence of floats in "
      f"(0, {_power_math.SIGMA_REL_MAX:.6f}], got {sigma_rels!r}."
    )
  if not sigma_rels:
    raise ValueError("`sigma_rels` must hold at least one value, got ().")
  out = []
  for s in sigma_rels:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
      raise TypeError(f"`sigma_rels` must hold floats, got {s!r} in {sigma_rels!r}.")
    s = float(s)
    if math.isnan(s) or not 0.0 < s <= _power_math.SIGMA_REL_MAX:
      raise ValueError(
        f"`sigma_rels` values must be in (0, {_power_math.SIGMA_REL_MAX:.6f}] "
        f"(the widest power-function profile), got {s!r} in {sigma_rels!r}."
      )
    out.append(s)
  keys = [sigma_rel_key(s) for s in out]
  if len(set(keys)) != len(keys):
    raise ValueError(f"`sigma_rels` must not repeat a value, got {sigma_rels!r}.")
  return tuple(sorted(out))


def _power_leaf(average: jax.Array, value: jax.Array, weight: jax.Array) -> jax.Array:
  """``average + (value - average) * weight`` in at least float32."""
  dtype = average.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  a = average.astype(compute)
  new = a + (jnp.asarray(value).astype(compute) - a) * weight.astype(compute)
  return new.astype(dtype)


def power_ema(
  optimizer: optax.GradientTransformation,
  sigma_rels: Sequence[float] = (0.05, 0.10),
  *,
  ema_dtype: jax.typing.DTypeLike | None = None,
  mask: Any = None,
  **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer to keep power-function EMAs of the parameters (EDM2).

  Keeps one average per ``sigma_rel``, all advanced in a single pass over the
  parameters. With :math:`t` the index of the update (the first is
  :math:`t = 1`), :math:`x_t` the parameters after it, and :math:`\\gamma`
  the exponent of the profile (:func:`~optax_ema._power_math.sigma_rel_to_gamma`),

  .. math::

    \\hat{x}_t = \\beta_\\gamma(t)\\,\\hat{x}_{t-1} + (1 - \\beta_\\gamma(t))\\,x_t,
    \\qquad \\beta_\\gamma(t) = (1 - 1/t)^{\\gamma + 1},

  which is the weighted mean :math:`\\sum_{i \\le t} w_i x_i` with
  :math:`w_i = (i^{\\gamma+1} - (i-1)^{\\gamma+1}) / t^{\\gamma+1}`: weights
  growing like :math:`i^\\gamma`, a profile whose width is the fraction
  ``sigma_rel`` of the run so far, whatever its length. The increment
  :math:`1 - \\beta` is computed in float32 with ``expm1``/``log1p`` so that it
  stays accurate for long runs. The updates of ``optimizer`` are returned
  unchanged. Read one average with
  ``optax_ema.averaged_params(state, params, which=sigma_rel)`` and save
  snapshots for post-hoc reconstruction with :mod:`optax_ema.posthoc`.

  Args:
    optimizer: the optax transformation to wrap, or the name of an optax
      optimizer, as for :func:`optax_ema.moving_average`.
    sigma_rels: the profile widths to track, each in ``(0, 0.30028]``
      (EDM2 tracks 0.05 and 0.10). Stored in increasing order.
    ema_dtype: accumulator dtype for floating point leaves. ``None`` keeps
      float32/float64 leaves in their own dtype and accumulates float16 and
      bfloat16 leaves in float32.
    mask: optional pytree prefix of bools, or a callable of params returning
      one; leaves marked ``False`` are not averaged and cost no memory.
    **optimizer_kwargs: arguments of an optimizer given by name (e.g.
      ``learning_rate``), as for :func:`optax_ema.moving_average`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`PowerEmaState`. ``update`` requires ``params`` and forwards any
    extra keyword arguments to ``optimizer``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{params['w'][0]:.1f}")
    3.0
    >>> avg = optax_ema.averaged_params(state, params, which=0.10)
    >>> print(f"{avg['w'][0]:.4f}")
    2.9598

  References:
    Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving
    the Training Dynamics of Diffusion Models", CVPR 2024 (EDM2), section 3.1
    and appendix C.1.

  .. note::
    Unlike a constant-decay EMA, the profile forgets the start of training
    only in proportion: early parameters keep a weight of order
    :math:`(i / t)^{\\gamma+1}`.
  """
  optimizer = _optimizers.resolve_optimizer(optimizer, optimizer_kwargs, "power_ema")
  sigmas = _check_sigma_rels(sigma_rels)
  gammas = tuple(_power_math.sigma_rel_to_gamma(s) for s in sigmas)
  keys = tuple(sigma_rel_key(s) for s in sigmas)
  _core._check_ema_dtype(ema_dtype)
  if isinstance(mask, (str, bytes)):
    raise TypeError(f"`mask` must be a pytree of bools or a callable, got {mask!r}.")

  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> PowerEmaState:
    return PowerEmaState(
      inner_state=inner.init(params),
      averages={k: _core._init_average(params, mask, ema_dtype) for k in keys},
      count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: optax.Updates,
    state: PowerEmaState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, PowerEmaState]:
    reference = state.averages[keys[0]]
    _tree_utils.check_update_args("power_ema", reference, params, updates)
    new_updates, inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    weights = [_power_math.power_weight(state.count, g) for g in gammas]
    treedef = jax.tree.structure(reference, is_leaf=_tree_utils.is_none_or_masked)
    avg_leaves = [treedef.flatten_up_to(state.averages[k]) for k in keys]
    values = _core.latest_values(reference, params, new_updates, True)
    value_leaves = treedef.flatten_up_to(values)
    new_leaves: list[list[Any]] = [[] for _ in keys]
    # One pass over the leaves: each new parameter value is read once and
    # folded into every profile's average.
    for i, value in enumerate(value_leaves):
      for j, out in enumerate(new_leaves):
        out.append(
          _core.step_leaf(
            avg_leaves[j][i], value, lambda a, v, w=weights[j]: _power_leaf(a, v, w)
          )
        )
    averages = {k: treedef.unflatten(new_leaves[j]) for j, k in enumerate(keys)}
    count = optax.safe_increment(state.count)
    return new_updates, PowerEmaState(inner_state, averages, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def select_profile(state: PowerEmaState, which: Any) -> str:
  """The key of the profile ``which`` names (a tracked sigma_rel or an index)."""
  tracked = tracked_sigma_rels(state)
  choices = ", ".join(f"{s!r}" for s in tracked)
  if which is None:
    if len(tracked) == 1:
      return sigma_rel_key(tracked[0])
    raise ValueError(
      f"This power_ema state tracks {len(tracked)} profiles (sigma_rel "
      f"{choices}): pass `which=` one of them, or its index 0..{len(tracked) - 1}."
    )
  if isinstance(which, (bool, np.bool_)):
    raise TypeError(f"`which` must be a tracked sigma_rel or an index, got {which!r}.")
  if isinstance(which, (int, np.integer)):
    if not -len(tracked) <= int(which) < len(tracked):
      raise ValueError(
        f"`which` index {which!r} is out of range for the {len(tracked)} "
        f"tracked profiles (sigma_rel {choices})."
      )
    return sigma_rel_key(tracked[int(which)])
  if isinstance(which, str):
    if which in state.averages:
      return which
  elif isinstance(which, numbers.Real):
    for s in tracked:
      if math.isclose(float(which), s, rel_tol=1e-6):
        return sigma_rel_key(s)
  raise ValueError(
    f"`which`={which!r} is not a tracked profile; this state tracks sigma_rel "
    f"{choices} (or pass an index 0..{len(tracked) - 1}). For another "
    "sigma_rel, save snapshots and use optax_ema.posthoc.reconstruct."
  )


def _read_power_ema(state: PowerEmaState, which: Any) -> Any:
  return state.averages[select_profile(state, which)]


_averaged.register_average_state(PowerEmaState, _read_power_ema)
