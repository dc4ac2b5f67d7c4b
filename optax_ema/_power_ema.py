"""Power-function EMA (Karras et al., EDM2): several profiles in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from optax_ema import _engine
from optax_ema import _power_math
from optax_ema import _rules
from optax_ema import _states
from optax_ema import _transform
from optax_ema import _validation
from optax_ema._states import PowerEmaState as PowerEmaState


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
    optimizer: the optax transformation to wrap.
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
  _validation.check_mask(mask)
  storage = _validation.check_storage(
    ema_dtype, stochastic_rounding, offload, gammas=gammas
  )
  optimizer = _validation.checked_optimizer(
    optimizer, "power_ema", "optax_ema.power_ema(optax.adam(1e-3))"
  )
  engine = _engine.Engine(
    slots=tuple(_engine.Slot(_rules.Power(g)) for g in gammas),
    storage=storage,
    mask=mask,
  )
  layout = _states.PowerEmaLayout(sigmas)
  return _transform.averaging_transformation(optimizer, engine, layout, "power_ema")
