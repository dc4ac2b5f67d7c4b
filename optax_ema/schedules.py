"""Decay schedules for :func:`optax_ema.moving_average`.

Each schedule is a plain function ``count -> decay`` (``count`` the number of
updates applied before the step, an int32 scalar) that traces under
``jax.jit`` and returns a float32 scalar; pass it as ``average_decay``. Each
also carries ``schedule.step_size(count)``, its ``1 - decay`` computed
directly (with ``log1p``/``expm1`` where it is tiny) rather than from a
float32 decay near one: :func:`optax_ema.moving_average` averages with it, so
its steps keep their precision even at counts of 1e7.

:func:`per_leaf` marks a pytree prefix of decays as one decay per parameter
subtree (as opposed to a tuple or dict of decays, which keeps several
averages).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _power_math
from optax_ema import _rules
from optax_ema import _validation

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]

__all__ = [
  "from_half_life",
  "half_life",
  "per_leaf",
  "power",
  "tf_ramp",
  "to_half_life",
  "warmup",
]


def _step(count: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(count).astype(jnp.float32)


def _with_step_size(schedule: Any, step_size: Any) -> Schedule:
  """``schedule`` carrying ``step_size``, its ``1 - decay`` computed directly."""
  schedule.step_size = step_size
  return schedule


def warmup(
  max_decay: float,
  inv_gamma: float = 1.0,
  power: float = 2.0 / 3.0,
  min_decay: float = 0.0,
  start_step: int = 0,
) -> Schedule:
  """The EMA warmup ramp of timm / diffusers / ema-pytorch.

  With :math:`s = \\text{count} - \\text{start\\_step}`,

  .. math::

    d(s) = \\mathrm{clip}\\big(1 - (1 + s / \\gamma_{inv})^{-p},\\;
      d_{min},\\; d_{max}\\big),

  and :math:`d = 0` up to and at ``start_step`` (:math:`s \\le 0`: the
  average copies the parameters, also with ``min_decay > 0``, as the three
  libraries do on their first averaging step; from :math:`s = 1` on the
  decays agree with theirs). ``1 - d`` is computed as
  :math:`\\exp(-p\\,\\mathrm{log1p}(s / \\gamma_{inv}))`. ``power=2/3`` reaches
  0.999 near 31.6k steps, ``power=3/4`` near 10k steps (for ``inv_gamma=1``).

  Args:
    max_decay: the largest decay, in [0, 1].
    inv_gamma: the ramp's time scale in steps, > 0.
    power: the ramp's exponent, > 0.
    min_decay: the smallest decay once averaging has started, in
      [0, max_decay].
    start_step: the count at which the ramp starts, a non-negative int.

  Returns:
    A schedule ``count -> decay`` (float32).

  Examples:
    >>> from optax_ema import schedules
    >>> ramp = schedules.warmup(0.9999, power=0.75)
    >>> print([f"{float(ramp(c)):.4f}" for c in (0, 1, 10, 10_000)])
    ['0.0000', '0.4054', '0.8344', '0.9990']

  References:
    Wightman, timm ``ModelEmaV3`` (``get_decay``); von Platen et al.,
    diffusers ``EMAModel.get_decay``; Wang, ema-pytorch ``EMA.get_current_decay``.
  """
  max_decay, min_decay = _validation.check_decay_bounds(max_decay, min_decay)
  inv_gamma = _validation.check_positive(inv_gamma, "inv_gamma")
  power = _validation.check_positive(power, "power")
  _validation.check_int(start_step, "start_step")

  def log_keep(count: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    # Averaging from the step after the first (s > 0): on the first (s = 0)
    # the average copies the params, as in timm, diffusers and ema-pytorch,
    # whatever `min_decay` says.
    s = _step(count) - jnp.float32(start_step)
    return s > 0, -jnp.float32(power) * jnp.log1p(
      jnp.maximum(s, 0.0) / jnp.float32(inv_gamma)
    )

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    started, log = log_keep(count)
    decay = jnp.clip(-jnp.expm1(log), jnp.float32(min_decay), jnp.float32(max_decay))
    return jnp.where(started, decay, jnp.zeros_like(decay))

  def step_size(count: jax.typing.ArrayLike) -> jax.Array:
    started, log = log_keep(count)
    w = jnp.clip(
      jnp.exp(log), jnp.float32(1.0 - max_decay), jnp.float32(1.0 - min_decay)
    )
    return jnp.where(started, w, jnp.ones_like(w))

  return _with_step_size(schedule, step_size)


def tf_ramp(max_decay: float) -> Schedule:
  """The ramp of ``tf.train.ExponentialMovingAverage(num_updates=...)``.

  .. math::

    d(t) = \\min\\Big(d_{max}, \\frac{1 + t}{10 + t}\\Big)

  with :math:`t` the count (so the first update uses 0.1). Equivalent to
  ``moving_average(..., dynamic_decay=True)`` with ``start_step=0``.

  Args:
    max_decay: the largest decay, in [0, 1].

  Returns:
    A schedule ``count -> decay`` (float32).

  Examples:
    >>> from optax_ema import schedules
    >>> ramp = schedules.tf_ramp(0.999)
    >>> print([f"{float(ramp(c)):.4f}" for c in (0, 10, 100, 10**6)])
    ['0.1000', '0.5500', '0.9182', '0.9990']

  References:
    TensorFlow, ``tf.train.ExponentialMovingAverage`` (``num_updates``).
  """
  max_decay = _validation.check_unit(max_decay, "max_decay")

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    return jnp.minimum(jnp.float32(max_decay), 1.0 - step_size(count))

  def step_size(count: jax.typing.ArrayLike) -> jax.Array:
    # 1 - decay = 9 / (10 + t), exact to float32 rounding at any count.
    return jnp.maximum(9.0 / (10.0 + _step(count)), jnp.float32(1.0 - max_decay))

  return _with_step_size(schedule, step_size)


def from_half_life(steps: jax.typing.ArrayLike) -> Any:
  """The decay whose average forgets half of its past in ``steps`` steps.

  .. math::

    d = 2^{-1/h} = \\exp(-\\ln 2 / h)

  Args:
    steps: the half-life :math:`h` in steps, > 0 (a number or an array).

  Returns:
    The decay: a Python float (float64 math) for a Python number, else an
    array.

  Examples:
    >>> from optax_ema import schedules
    >>> print(f"{schedules.from_half_life(693.1):.6f}")
    0.999000

  References:
    MosaicML Composer, ``EMA(half_life=...)``.
  """
  if isinstance(steps, (numbers.Real, np.floating, np.integer)):
    h = _validation.check_positive(steps, "steps")
    return math.exp(-math.log(2.0) / h)
  xp = jnp if isinstance(steps, jax.Array) else np
  return xp.exp(-math.log(2.0) / xp.asarray(steps))


def to_half_life(decay: jax.typing.ArrayLike) -> Any:
  """The half-life in steps of a decay: the inverse of :func:`from_half_life`.

  .. math::

    h = \\frac{-\\ln 2}{\\ln d} = \\frac{-\\ln 2}{\\mathrm{log1p}(d - 1)}

  Args:
    decay: the decay, in (0, 1) (a number or an array).

  Returns:
    The half-life in steps: a Python float for a Python number, else an
    array.

  Examples:
    >>> from optax_ema import schedules
    >>> print(f"{schedules.to_half_life(0.999):.1f}")
    692.8
  """
  if isinstance(decay, (numbers.Real, np.floating, np.integer)):
    d = _validation.check_half_life_decay(decay)
    return -math.log(2.0) / math.log1p(d - 1.0)
  xp = jnp if isinstance(decay, jax.Array) else np
  d = xp.asarray(decay)
  return -math.log(2.0) / xp.log1p(d - 1.0)


def half_life(steps: float) -> Schedule:
  """A constant decay given by its half-life in steps.

  .. math::

    d(t) = 2^{-1/h}

  After :math:`h` steps the weight of the past average has halved; the
  effective window :math:`1 / (1 - d)` is about :math:`h / \\ln 2 \\approx
  1.44\\,h` steps. The decay is computed in float64 and rounded once to
  float32.

  Args:
    steps: the half-life :math:`h` in steps, > 0.

  Returns:
    A schedule ``count -> decay`` (float32, constant).

  Examples:
    >>> from optax_ema import schedules
    >>> sched = schedules.half_life(1000)
    >>> print(f"{float(sched(0)):.6f}")
    0.999307

  References:
    MosaicML Composer, ``EMA(half_life=...)``; torchtitan's EMA.
  """
  h = _validation.check_positive(steps, "steps")
  decay = from_half_life(h)
  w = -math.expm1(-math.log(2.0) / h)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    return jnp.full(jnp.shape(count), decay, jnp.float32)

  def step_size(count: jax.typing.ArrayLike) -> jax.Array:
    return jnp.full(jnp.shape(count), w, jnp.float32)

  return _with_step_size(schedule, step_size)


def power(gamma: float | None = None, sigma_rel: float | None = None) -> Schedule:
  """The power-function EMA of EDM2: ``(1 - 1/t) ** (gamma + 1)``.

  With :math:`t = \\text{count} + 1` (the first update copies the
  parameters),

  .. math::

    d(t) = (1 - 1/t)^{\\gamma + 1}
      = \\exp\\big((\\gamma + 1)\\,\\mathrm{log1p}(-1/t)\\big),

  which weighs the parameters seen so far like :math:`\\tau^{\\gamma}`: the
  averaging window grows with training. Give either ``gamma`` or the
  profile's relative width ``sigma_rel`` (converted with the largest real
  root of the cubic of Karras et al.; ``sigma_rel=0.05`` is
  :math:`\\gamma \\approx 16.97`, ``0.10`` is :math:`\\approx 6.94`).

  Args:
    gamma: the exponent, > -1.
    sigma_rel: the relative standard deviation of the profile, in
      (0, 0.30028].

  Returns:
    A schedule ``count -> decay`` (float32).

  Examples:
    >>> from optax_ema import schedules
    >>> sched = schedules.power(sigma_rel=0.05)
    >>> print([f"{float(sched(c)):.4f}" for c in (0, 1, 99)])
    ['0.0000', '0.0000', '0.8347']

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, section 3.1 and appendix C.
  """
  g = _validation.check_power_profile(gamma, sigma_rel)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    return _power_math.power_decay(count, g)

  def step_size(count: jax.typing.ArrayLike) -> jax.Array:
    return _power_math.power_weight(count, g)

  return _with_step_size(schedule, step_size)


def per_leaf(prefix: Any) -> _rules.PerLeafDecay:
  """One decay (or schedule) per parameter subtree.

  ``prefix`` is a pytree prefix of the parameters with a decay or a
  schedule at each leaf, e.g. a slower average for embeddings. Without this
  marker a dict or tuple of decays means several averages. Combine freely
  with ``mask`` (masked-out leaves keep no average, whatever their decay),
  ``debias`` (one bias-correction weight per leaf) and ``update_every``.

  Args:
    prefix: a pytree prefix of the params holding decays in [0, 1] or
      schedules.

  Returns:
    A marker object to pass as ``average_decay`` (or as one entry of a
    tuple/dict of decays).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import schedules
    >>> params = {"embed": jnp.zeros(2), "dense": jnp.zeros(2)}
    >>> decay = schedules.per_leaf({"embed": 0.9, "dense": 0.5})
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), decay)
    >>> state = tx.init(params)
    >>> grads = {"embed": -jnp.ones(2), "dense": -jnp.ones(2)}
    >>> _, state = tx.update(grads, state, params)
    >>> avg = optax_ema.averaged_params(state)
    >>> print(f"{avg['embed'][0]:.2f} {avg['dense'][0]:.2f}")
    0.10 0.50
  """
  if isinstance(prefix, _rules.PerLeafDecay):
    return prefix
  return _rules.PerLeafDecay(prefix)
