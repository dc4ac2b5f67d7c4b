"""Power-function EMA profiles (Karras et al., EDM2, 2024): the scalar math.

A power-function EMA averages the parameters seen up to step :math:`t` with
weights proportional to :math:`\\tau^\\gamma`; its width is given either by
the exponent :math:`\\gamma` or by the relative standard deviation
:math:`\\sigma_{rel}` of the profile (the standard deviation of the weights'
distribution over :math:`[0, t]`, divided by :math:`t`).

Every function here works on Python numbers, NumPy arrays and (traced) JAX
arrays alike; concrete out-of-range inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at the root of
# gamma**2 + 3 gamma + 1 = 0 and falls back to 0 as gamma grows: the largest
# gamma for a given sigma_rel exists up to this maximum.
GAMMA_AT_MAX_SIGMA_REL = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_MAX = math.sqrt(
  (GAMMA_AT_MAX_SIGMA_REL + 1.0)
  / ((GAMMA_AT_MAX_SIGMA_REL + 2.0) ** 2 * (GAMMA_AT_MAX_SIGMA_REL + 3.0))
)


def _is_concrete(x: Any) -> bool:
  if isinstance(x, jax.core.Tracer):
    return False
  try:
    np.asarray(x)
  except Exception:  # anything not convertible is not concrete
    return False
  return True


def _xp(x: Any) -> Any:
  """NumPy for NumPy/Python inputs (float64 math), jax.numpy for JAX arrays."""
  return jnp if isinstance(x, jax.Array) else np


def gamma_to_sigma_rel(gamma: jax.typing.ArrayLike) -> Any:
  """The relative standard deviation of a power-function EMA profile.

  For weights proportional to :math:`\\tau^\\gamma` on :math:`[0, t]`,

  .. math::

    \\sigma_{rel} = \\sqrt{\\frac{\\gamma + 1}{(\\gamma + 2)^2 (\\gamma + 3)}}.

  Args:
    gamma: the exponent(s), greater than -1 (a number or an array).

  Returns:
    ``sigma_rel``, a float for a Python number, else an array of the same
    shape (NumPy float64 for NumPy input, a JAX array for JAX input).

  Raises:
    ValueError: a concrete ``gamma`` <= -1 or NaN.

  Examples:
    >>> from optax_ema._power_math import gamma_to_sigma_rel
    >>> print(f"{gamma_to_sigma_rel(6.94):.4f}")
    0.1000

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, section 3.1 and appendix C.2.
  """
  if _is_concrete(gamma):
    g = np.asarray(gamma, dtype=np.float64)
    if np.any(~(g > -1.0)):
      raise ValueError(f"`gamma` must be > -1, got {gamma!r}.")
  xp = _xp(gamma)
  g = xp.asarray(gamma) if xp is jnp else np.asarray(gamma, dtype=np.float64)
  out = xp.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))
  return float(out) if isinstance(gamma, (int, float)) else out


def sigma_rel_to_gamma(sigma_rel: jax.typing.ArrayLike) -> Any:
  """The exponent of the power-function EMA profile of a given width.

  Solves :math:`\\sigma_{rel}^2 (\\gamma + 2)^2 (\\gamma + 3) = \\gamma + 1`,
  i.e. the cubic

  .. math::

    \\gamma^3 + 7 \\gamma^2 + (16 - \\sigma_{rel}^{-2}) \\gamma
    + 12 - \\sigma_{rel}^{-2} = 0,

  and returns its largest real root (the one on the branch where a wider
  profile means a smaller exponent). The root is taken in closed form
  (trigonometric method: for :math:`0 < \\sigma_{rel} \\le` ``SIGMA_REL_MAX``
  :math:`\\approx 0.3003` the cubic has three real roots), so it traces
  under ``jax.jit``.

  Args:
    sigma_rel: the relative standard deviation(s), in
      ``(0, SIGMA_REL_MAX]``.

  Returns:
    ``gamma``, a float for a Python number, else an array of the same shape.
    A traced ``sigma_rel`` outside the range gives NaN.

  Raises:
    ValueError: a concrete ``sigma_rel`` outside ``(0, SIGMA_REL_MAX]``.

  Examples:
    >>> from optax_ema._power_math import sigma_rel_to_gamma
    >>> for sigma_rel in (0.05, 0.10):
    ...   print(f"{sigma_rel_to_gamma(sigma_rel):.4f}")
    16.9722
    6.9372

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, appendix C.2 (equation for gamma).
  """
  if _is_concrete(sigma_rel):
    s = np.asarray(sigma_rel, dtype=np.float64)
    if np.any(~((s > 0.0) & (s <= SIGMA_REL_MAX * (1 + 1e-12)))):
      raise ValueError(
        f"`sigma_rel` must be in (0, {SIGMA_REL_MAX:.6f}] (the widest "
        f"power-function profile), got {sigma_rel!r}."
      )
  xp = _xp(sigma_rel)
  s = xp.asarray(sigma_rel) if xp is jnp else np.asarray(sigma_rel, dtype=np.float64)
  big_t = 1.0 / (s * s)
  # Depressed cubic y**3 + p y + q = 0 with gamma = y - 7/3.
  a, b, c = 7.0, 16.0 - big_t, 12.0 - big_t
  p = b - a * a / 3.0
  q = 2.0 * a**3 / 27.0 - a * b / 3.0 + c
  # p < 0 in the valid range; the guarded sqrt keeps traced NaNs out of it.
  neg_p = xp.maximum(-p, 1e-30)
  arg = (3.0 * q / (2.0 * p)) * xp.sqrt(3.0 / neg_p)
  if xp is np:
    arg = np.clip(arg, -1.0, 1.0)
  else:
    arg = jnp.where(jnp.abs(arg) <= 1.0 + 1e-6, jnp.clip(arg, -1.0, 1.0), jnp.nan)
  y = 2.0 * xp.sqrt(neg_p / 3.0) * xp.cos(xp.arccos(arg) / 3.0)
  out = y - a / 3.0
  return float(out) if isinstance(sigma_rel, (int, float)) else out


def power_decay(count: jax.typing.ArrayLike, gamma: jax.typing.ArrayLike) -> jax.Array:
  """The decay of a power-function EMA at the update after ``count`` updates.

  With :math:`t = \\text{count} + 1` the index of the update being averaged
  (the first update is :math:`t = 1`), EDM2's decay is

  .. math::

    \\beta_\\gamma(t) = (1 - 1/t)^{\\gamma + 1}
      = \\exp\\big((\\gamma + 1)\\,\\mathrm{log1p}(-1/t)\\big),

  so the first update copies the parameters (:math:`\\beta = 0`) and the
  average after :math:`t` updates weighs the parameters :math:`x_i` of update
  :math:`i` by :math:`(i^{\\gamma+1} - (i-1)^{\\gamma+1}) / t^{\\gamma+1}`.
  This ``count`` convention is the one of :func:`optax_ema.moving_average`
  schedules (the count before the step), so ``lambda c: power_decay(c, g)``
  is a schedule for it.

  Args:
    count: the number of updates applied before this one (int, >= 0).
    gamma: the profile exponent, > -1.

  Returns:
    A float32 scalar (or array, broadcasting ``count`` and ``gamma``).

  Examples:
    >>> from optax_ema._power_math import power_decay
    >>> print([f"{float(power_decay(c, 1.0)):.4f}" for c in range(4)])
    ['0.0000', '0.2500', '0.4444', '0.5625']

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, equation (3) and appendix C.1.

  .. note::
    For long runs use :func:`power_weight` (``1 - decay`` computed with
    ``expm1``) where the increment itself is needed: ``1 - power_decay`` in
    float32 loses relative precision as the decay approaches 1.
  """
  return jnp.exp(_log_decay(count, gamma))


def power_weight(count: jax.typing.ArrayLike, gamma: jax.typing.ArrayLike) -> jax.Array:
  """``1 - power_decay(count, gamma)``, accurate in float32 for large counts.

  .. math::

    1 - \\beta_\\gamma(t) = -\\mathrm{expm1}\\big((\\gamma + 1)\\,
      \\mathrm{log1p}(-1/t)\\big), \\quad t = \\text{count} + 1.

  Args:
    count: the number of updates applied before this one (int, >= 0).
    gamma: the profile exponent, > -1.

  Returns:
    A float32 scalar (or array): the weight of the new parameters.

  Examples:
    >>> from optax_ema._power_math import power_weight
    >>> print(f"{float(power_weight(10**7, 6.94)):.4e}")
    7.9400e-07

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, equation (3).
  """
  return -jnp.expm1(_log_decay(count, gamma))


def _log_decay(count: Any, gamma: Any) -> jax.Array:
  t = jnp.asarray(count).astype(jnp.float32) + 1.0
  g = jnp.asarray(gamma, jnp.float32)
  # t == 1 gives log1p(-1) = -inf and a decay of exactly 0.
  return (g + 1.0) * jnp.log1p(-1.0 / t)


def sigma_rel_to_ema_decay(sigma_rel: Any, num_steps: Any) -> Any:
  """The classic constant EMA decay whose profile is as wide after ``num_steps``.

  A constant-decay EMA weighs the parameters ``k`` steps back by
  :math:`(1 - d) d^k`, a geometric distribution of standard deviation
  :math:`\\sqrt{d} / (1 - d)` steps. Equating it with
  :math:`\\sigma_{rel} \\cdot` ``num_steps`` and solving for :math:`d` gives
  :math:`d = u^2` with :math:`u = (\\sqrt{1 + 4 s^2} - 1) / (2 s)`.

  Args:
    sigma_rel: relative standard deviation(s), > 0.
    num_steps: the training length the width is relative to, > 0.

  Returns:
    The decay(s), NumPy float64 (a float for Python numbers).

  Examples:
    >>> from optax_ema._power_math import sigma_rel_to_ema_decay
    >>> print(f"{sigma_rel_to_ema_decay(0.05, 10_000):.5f}")
    0.99800

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, section 3.1 (sigma_rel of a classic EMA).
  """
  s_rel = np.asarray(sigma_rel, dtype=np.float64)
  steps = np.asarray(num_steps, dtype=np.float64)
  if np.any(~(s_rel > 0)) or np.any(~(steps > 0)):
    raise ValueError(
      f"`sigma_rel` and `num_steps` must be > 0, got {sigma_rel!r} and {num_steps!r}."
    )
  s = s_rel * steps
  u = (np.sqrt(1.0 + 4.0 * s * s) - 1.0) / (2.0 * s)
  out = u * u
  return float(out) if np.ndim(out) == 0 else out
