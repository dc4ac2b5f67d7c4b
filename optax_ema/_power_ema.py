"""Power-function EMA (Karras et al., EDM2): several profiles in one pass."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _engine
from optax_ema import _power_math
from optax_ema import _rules
from optax_ema import _states
from optax_ema import _storage
from optax_ema import _transform
from optax_ema import _validation
from optax_ema._states import PowerEmaState as PowerEmaState


def _warn_if_profiles_freeze(ema_dtype: Any, gamma: float) -> None:
  """Round-to-nearest narrow storage stops a power profile after a while.

  A profile's step ``1 - beta(t)`` shrinks like ``(gamma + 1) / t``; by the
  rule of the moving average's warning (a parameter moving by 1e-3 of its
  value per step, half a place of the storage dtype at most ``eps / 2`` of
  it), every step rounds back from about ``t = 2e-3 (gamma + 1) / eps`` on.
  """
  storage = jnp.dtype(ema_dtype)
  if storage.itemsize >= 4:
    return
  eps = float(jnp.finfo(storage).eps)
  after = max(1, round(2 * _validation.RELATIVE_MOVE * (gamma + 1) / eps))
  warnings.warn(
    f"`ema_dtype`={storage.name} with `stochastic_rounding=False`: a power "
    f"profile's step shrinks like (gamma + 1) / t, and for a parameter "
    f"moving by {_validation.RELATIVE_MOVE:g} of its value per step it moves "
    f"the average by less than half a {storage.name} place from about "
    f"{after:,} updates on, from where round-to-nearest storage will not "
    "move. Leave `stochastic_rounding` at its default, or store the averages "
    "in float32.",
    UserWarning,
    stacklevel=4,
  )


def power_ema(
  optimizer: optax.GradientTransformation,
  sigma_rels: Sequence[float] = (0.05, 0.10),
  *,
  ema_dtype: jax.typing.DTypeLike | None = None,
  mask: Any = None,
  stochastic_rounding: bool | None = None,
  offload: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer to keep power-function EMAs of the parameters (EDM2).

  Keeps one average per ``sigma_rel``, all advanced in a single pass over the
  parameters. With :math:`t` the index of the update (the first is
  :math:`t = 1`), :math:`x_t` the parameters after it, and :math:`\\gamma`
  the exponent of the profile (:func:`optax_ema.posthoc.sigma_rel_to_gamma`),

  .. math::

    \\hat{x}_t = \\beta_\\gamma(t)\\,\\hat{x}_{t-1} + (1 - \\beta_\\gamma(t))\\,x_t,
    \\qquad \\beta_\\gamma(t) = (1 - 1/t)^{\\gamma + 1},

  which is the weighted mean :math:`\\sum_{i \\le t} w_i x_i` with
  :math:`w_i = (i^{\\gamma+1} - (i-1)^{\\gamma+1}) / t^{\\gamma+1}`: weights
  growing like :math:`i^\\gamma`, a profile whose width is the fraction
  ``sigma_rel`` of the run so far, whatever its length. The increment
  :math:`1 - \\beta` is computed in float32 with ``expm1``/``log1p`` so that it
  stays accurate for long runs. The updates of ``optimizer`` are returned
  unchanged, and :math:`t` counts the updates it applies (not
  ``optax.MultiSteps`` micro-steps). Read one average with
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
    stochastic_rounding: for a bfloat16/float16 ``ema_dtype``, round each new
      average stochastically (``None``, the default, and ``True``) or to
      nearest (``False``), as in :func:`optax_ema.moving_average`.
    offload: keep the floating-point averages in host memory, as
      :func:`optax_ema.moving_average` does with ``offload=True``.

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
  sigmas = _validation.check_sigma_rels(sigma_rels)
  gammas = tuple(_power_math.sigma_rel_to_gamma(s) for s in sigmas)
  _validation.check_ema_dtype(ema_dtype)
  _validation.check_mask(mask)
  if stochastic_rounding is not None:
    _validation.check_bool(stochastic_rounding, "stochastic_rounding")
  if stochastic_rounding is False and ema_dtype is not None:
    _warn_if_profiles_freeze(ema_dtype, max(gammas))
  _validation.check_bool(offload, "offload")
  engine = _engine.Engine(
    slots=tuple(_engine.Slot(_rules.Power(g)) for g in gammas),
    storage=_storage.Storage(ema_dtype, stochastic_rounding, bool(offload)),
    mask=mask,
  )
  layout = _states.PowerEmaLayout(sigmas)
  return _transform.averaging_transformation(optimizer, engine, layout, "power_ema")
