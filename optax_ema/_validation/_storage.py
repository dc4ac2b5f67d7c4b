"""Checks of the storage options: ``ema_dtype``, ``stochastic_rounding``, ``offload``.

:func:`check_storage` checks the three together, once, for every averaging
transform, and returns them as one :class:`~optax_ema._storage.Storage`. It
also warns when round-to-nearest storage would freeze the averages it is
told about (constant decays and schedules, or power profiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _storage
from optax_ema import _tree_utils
from optax_ema import _warn
from optax_ema._validation import _decays
from optax_ema._validation import _numbers

# The relative move per step of the parameter that the nearest-rounding
# warnings assume: a slowly moving parameter, late in training.
RELATIVE_MOVE = 1e-3


def check_ema_dtype(ema_dtype: Any) -> None:
  """None or a floating point dtype of at least 16 bits."""
  if ema_dtype is None:
    return
  if isinstance(ema_dtype, (jax.Array, np.ndarray)):
    raise TypeError(
      "`ema_dtype` must be a dtype, got an array: under "
      "optax.inject_hyperparams a dtype is callable and is taken for a "
      "schedule; pass `static_args=('ema_dtype',)` to optax.inject_hyperparams."
    )
  try:
    dtype = jnp.dtype(ema_dtype)
  except TypeError:
    raise TypeError(
      f"`ema_dtype` must be None or a floating point dtype, got {ema_dtype!r}."
    ) from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`ema_dtype` must be a floating point dtype, got {dtype.name}.")
  if jnp.finfo(dtype).bits < 16:
    raise ValueError(
      f"`ema_dtype` must be a floating point dtype of at least 16 bits, got "
      f"{dtype.name}: an average in it cannot resolve the steps of any "
      "useful decay."
    )


def nearest_rounding_freezes(decay: float, storage: Any) -> bool:
  """Whether round-to-nearest ``storage`` freezes an average of ``decay``.

  The rule: a parameter ``a`` moving by ``1e-3 * |a|`` per step moves its
  average by ``(1 - decay) * 1e-3 * |a|``; below half a place (ulp) of ``a``
  in ``storage``, that rounds back. Half a place is at most ``eps / 2`` of
  ``|a|`` (at a power of two), so this is ``(1 - decay) * 1e-3 < eps / 2``:
  true for every decay in (0, 1) in bfloat16, above 0.512 in float16. A
  decay of 0 (a copy) or 1 (no average) never warns.
  """
  step = 1.0 - float(np.float32(decay))
  eps = float(jnp.finfo(storage).eps)
  return 0.0 < step < 1.0 and step * RELATIVE_MOVE < eps / 2


def _unresolvable(
  decay: _decays.DecayLeaf, storage: Any, name: str
) -> tuple[str, str] | None:
  """What :func:`warn_if_unresolvable` says of ``decay`` and its verdict.

  None when there is nothing to say.
  """
  value, samples = decay
  if _tree_utils.is_concrete_scalar(value):
    if not nearest_rounding_freezes(value, storage):
      return None
    step = 1.0 - float(np.float32(value))
    return f"`{name}`={value!r}: a step moves the average by {step:.2g}", "is"
  if callable(value):
    if samples is None:
      return None
    below = [i for i, v in enumerate(samples) if nearest_rounding_freezes(v, storage)]
    if not below:
      return None
    count = _decays.SAMPLED_COUNTS[below[0]]
    what = (
      f"`{name}` (a schedule): from about count {count} on, a step moves the "
      f"average by {1.0 - samples[below[0]]:.2g}"
    )
    return what, "is"
  what = (
    f"`{name}` is traced (optax.inject_hyperparams), so its value cannot be "
    "checked here: a step moves the average by (1 - decay)"
  )
  return what, "may be"


def warn_if_unresolvable(decay: _decays.DecayLeaf, storage: Any, name: str) -> None:
  """Warns when round-to-nearest storage would freeze an average of ``decay``.

  The rule is :func:`nearest_rounding_freezes`: a parameter moving by 1e-3
  of its value per step moves the average by ``(1 - decay) * 1e-3`` of it,
  and below half a place of the storage dtype every step rounds back. A
  constant decay is checked, a schedule at its samples
  (:data:`~optax_ema._validation.SAMPLED_COUNTS`); a traced decay cannot be,
  and warns as well.
  """
  said = _unresolvable(decay, storage, name)
  if said is None:
    return
  what, verdict = said
  eps = float(jnp.finfo(storage).eps)
  dtype = jnp.dtype(storage).name
  _warn.warn(
    f"{what} of its distance to the params, with `ema_dtype`={dtype} and "
    f"`stochastic_rounding=False`. For a parameter moving by {RELATIVE_MOVE:g} "
    f"of its value per step, (1 - decay) times that move {verdict} below "
    f"half a {dtype} place ({eps / 2:.2g} of the value at most), where "
    "round-to-nearest storage will not move. Leave `stochastic_rounding` at "
    "its default, or store the average in float32."
  )


def warn_if_profiles_freeze(storage: Any, gamma: float) -> None:
  """Round-to-nearest narrow storage stops a power profile after a while.

  A profile's step ``1 - beta(t)`` shrinks like ``(gamma + 1) / t``; by the
  rule of the moving average's warning (a parameter moving by 1e-3 of its
  value per step, half a place of the storage dtype at most ``eps / 2`` of
  it), every step rounds back from about ``t = 2e-3 (gamma + 1) / eps`` on.
  """
  dtype = jnp.dtype(storage)
  if dtype.itemsize >= 4:
    return
  eps = float(jnp.finfo(dtype).eps)
  after = max(1, round(2 * RELATIVE_MOVE * (gamma + 1) / eps))
  _warn.warn(
    f"`ema_dtype`={dtype.name} with `stochastic_rounding=False`: a power "
    f"profile's step shrinks like (gamma + 1) / t, and for a parameter "
    f"moving by {RELATIVE_MOVE:g} of its value per step it moves "
    f"the average by less than half a {dtype.name} place from about "
    f"{after:,} updates on, from where round-to-nearest storage will not "
    "move. Leave `stochastic_rounding` at its default, or store the averages "
    "in float32."
  )


def check_storage(
  ema_dtype: Any,
  stochastic_rounding: Any,
  offload: Any,
  *,
  decays: Sequence[_decays.DecayLeaf] = (),
  gammas: Sequence[float] = (),
  strict_rounding: bool = False,
) -> _storage.Storage:
  """The three storage options, checked once, as a :class:`Storage`.

  Args:
    ema_dtype: None or a floating point dtype of at least 16 bits.
    stochastic_rounding: None or a bool.
    offload: a bool.
    decays: the decays the averages take (:attr:`AverageDecays.leaves`):
      with ``stochastic_rounding=False`` and a narrow ``ema_dtype``, each
      one that round-to-nearest storage would freeze warns.
    gammas: the power profiles the averages follow: the same, for the
      widest of them (the last to freeze), in one warning.
    strict_rounding: whether ``stochastic_rounding=True`` needs a narrow
      ``ema_dtype`` (moving_average refuses it otherwise; power_ema lets it
      be, as nothing is rounded).

  Returns:
    ``Storage(dtype, stochastic, offload)``: the dtype as a ``jnp.dtype`` (or
    None), the rounding and offload as Python bools (or None).
  """
  check_ema_dtype(ema_dtype)
  if stochastic_rounding is not None:
    _numbers.check_bool(stochastic_rounding, "stochastic_rounding")
  _numbers.check_bool(offload, "offload")
  dtype = None if ema_dtype is None else jnp.dtype(ema_dtype)
  stochastic = None if stochastic_rounding is None else bool(stochastic_rounding)
  narrow = dtype is not None and dtype.itemsize < 4
  if strict_rounding and stochastic and not narrow:
    raise ValueError(
      "`stochastic_rounding=True` needs `ema_dtype=jnp.bfloat16` or "
      "`jnp.float16` (it rounds the float32 result to that storage), got "
      f"`ema_dtype`={ema_dtype!r}."
    )
  if stochastic is False and narrow:
    for decay in decays:
      warn_if_unresolvable(decay, dtype, "average_decay")
    if gammas:
      warn_if_profiles_freeze(dtype, max(gammas))
  return _storage.Storage(dtype, stochastic, bool(offload))
