"""The moving-average wrapper: TFA's ``MovingAverage`` as an Optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_ema import _engine
from optax_ema import _rules
from optax_ema import _states
from optax_ema import _transform
from optax_ema import _validation
from optax_ema._states import MovingAverageState as MovingAverageState

# What the refusal of optax.ema as the optimizer to wrap suggests instead.
_EXAMPLE = "optax_ema.moving_average(optax.adam(1e-3), average_decay=0.999)"

DecayLike = float | jax.typing.ArrayLike | Callable[[jax.Array], jax.typing.ArrayLike]


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
  stochastic_rounding: bool | None = None,
  overwrite_every: int | None = None,
  overwrite_with: Any = None,
  offload: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer to keep an exponential moving average of the params.

  A port of TensorFlow Addons' ``tfa.optimizers.MovingAverage``. The wrapped
  optimizer's updates are returned unchanged (wrapping never changes
  training, unless ``overwrite_every`` asks for it); after each update the
  state also holds

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

  The average moves exactly on the steps where the wrapped optimizer applies
  an update: inside ``moving_average`` (through ``optax.chain``,
  ``optax.named_chain`` and ``optax.inject_hyperparams``), an
  ``optax.MultiSteps`` micro-step and a step that ``optax.apply_if_finite``
  rejects neither move nor count (and ``optax.MultiSteps(moving_average(...))``
  gives the same average). A schedule counts those real steps; under
  ``optax.inject_hyperparams`` pass ``static_args=("average_decay",)`` for
  that, since it otherwise evaluates the schedule on its own count.

  Beyond TFA (all off by default): several averages at once, per-leaf
  decays, zero-debiasing, averaging only every k-th step, low-precision
  storage, periodically moving the params onto the average; see the
  arguments below and :mod:`optax_ema.schedules` for decay schedules.

  Args:
    optimizer: the optax transformation to wrap.
    average_decay: a float in [0, 1] or a schedule ``count -> decay`` (e.g.
      from :mod:`optax_ema.schedules`); or
      :func:`optax_ema.schedules.per_leaf` of a pytree prefix of those (one
      decay per parameter subtree); or a tuple/list or a dict of any of
      these, which keeps one average per entry, updated in the same pass
      (the state's ``average`` is then an :class:`optax_ema.Averages`; pick
      one with ``averaged_params(..., which=...)``). A decay in a dtype
      narrower than float32 is an error (it rounds 0.999 to 1.0). Numbers
      are range-checked here, a schedule at sampled counts; a decay known
      only in the step (traced by ``optax.inject_hyperparams`` or ``jit``,
      or a schedule's value) outside [0, 1] or NaN makes that step not
      average: it still counts, and records a NaN step size (a NaN decay in
      :func:`optax_ema.diagnostics`).
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
      are stored as ``optax.MaskedNode()``). Under
      ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)``.
    skip_nonfinite: if True, a step whose incoming gradients or new
      parameters hold a NaN or an infinity leaves the average and the count
      untouched (the inner optimizer's update is still returned as it is).
    debias: if True, the average counts as zero until its first averaging
      step and is read through the bias correction
      ``average / (1 - prod(decays so far))`` (exact under schedules: the
      state keeps the running product in a :class:`optax_ema.DebiasedAverage`);
      :func:`optax_ema.averaged_params` applies it, and returns the params
      before the first averaging step. A decay of 1, which never averages (a
      constant, or a schedule that is 1 at every count sampled; no
      ``num_updates``, ``dynamic_decay`` or ``start_step``), is refused with
      ``debias``.
    update_every: ``None`` (every step) or a positive int ``k``: move the
      average only on every k-th update (``(t + 1) % k == 0``), by the product
      of the decays of the ``k`` updates since the last move (``decay ** k``
      for a constant decay), so the averaging window in steps does not
      change; the other steps do not touch the average (a ``lax.cond``; on
      GPU and TPU a ``while`` loop of zero or one iteration, but a
      ``lax.cond`` for offloaded averages on TPU).
    stochastic_rounding: how an average stored in a narrower dtype than it is
      computed in (``ema_dtype=jnp.bfloat16`` or ``jnp.float16``) is rounded.
      ``None`` (the default) and ``True`` round each new average up or down
      at random, unbiased, with bits that are a fixed function of the step
      and the leaf (identical on every device): it keeps moving where
      nearest rounding gets stuck. ``False`` rounds to nearest, and warns
      when the average would freeze: when ``(1 - decay) * 1e-3`` (the step
      for a parameter moving by 1e-3 of its value) is below half a place of
      the storage dtype, ``eps / 2``; so at every decay in (0, 1) for
      bfloat16, above 0.512 for float16.
    overwrite_every: ``None`` or a positive multiple ``k`` of
      ``update_every``: on every k-th update, return updates that move the
      params onto the new average (so that ``optax.apply_updates`` leaves the
      params equal to it, to one rounding), "Switch EMA"; training continues
      from there. Masked-out and non-float leaves are never overwritten.
      The transform must be last in its ``optax.chain``: a transformation
      after it (say ``optax.scale``) changes these updates too, and the
      params land elsewhere. ``update`` cannot see what follows it, so this
      is not detected while training; :func:`optax_ema.averaged_params` and
      :func:`optax_ema.diagnostics` warn when given the whole state.
    overwrite_with: with several decays, which average overwrites the params
      (as ``which=`` of :func:`optax_ema.averaged_params`); required there.
    offload: if True, keep every floating-point average leaf in the host
      memory (``pinned_host``) of its parameter's devices, sharded like the
      parameter, from ``init`` on; each averaging step brings it to the
      device and back (on TPU the host's CPU moves it where it lies, see
      the guide), and steps that do not average (``update_every``,
      micro-steps, skipped steps) move nothing. The count, debias weights
      and non-float leaves stay in device memory. See
      :func:`optax_ema.state_shardings` for ``jit`` and restore targets.

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
    Li et al., "Switch EMA: A Free Lunch for Better Flatness and Sharpness",
    2024 (``overwrite_every``).

  .. warning::
    With float16/bfloat16 parameters, keep the default float32 accumulator
    where memory allows; a bfloat16 or float16 average relies on stochastic
    rounding to move at high decays.
  """
  checked = _validation.check_average_decay(average_decay)
  decays, keys, several, _ = checked
  for name, value in (
    ("sequential_update", sequential_update),
    ("dynamic_decay", dynamic_decay),
    ("skip_nonfinite", skip_nonfinite),
    ("debias", debias),
  ):
    _validation.check_bool(value, name)
  _validation.check_int(num_updates, "num_updates", allow_none=True)
  _validation.check_int(start_step, "start_step")
  _validation.check_mask(mask)
  every = _validation.check_update_every(update_every)
  storage = _validation.check_storage(
    ema_dtype, stochastic_rounding, offload, decays=checked.leaves, strict_rounding=True
  )
  _validation.check_debias(
    bool(debias), checked, num_updates, bool(dynamic_decay), start_step
  )
  overwrite, slot = _validation.check_overwrite(
    overwrite_every, overwrite_with, every, bool(sequential_update), checked
  )
  optimizer = _validation.checked_optimizer(optimizer, "moving_average", _EXAMPLE)
  layout = _states.MovingAverageLayout(keys, decays, several)
  clamps = dict(
    num_updates=num_updates, start_step=start_step, dynamic_decay=bool(dynamic_decay)
  )
  rules = [_rules.decay_rule(d, **clamps) for d in decays]
  if every > 1:
    rules = [_rules.Every(r, every) for r in rules]
  engine = _engine.Engine(
    slots=tuple(_engine.Slot(r, bool(debias)) for r in rules),
    storage=storage,
    mask=mask,
    sequential=bool(sequential_update),
    skip_nonfinite=bool(skip_nonfinite),
    overwrite_every=overwrite,
    overwrite_slot=slot,
  )
  return _transform.averaging_transformation(
    optimizer, engine, layout, "moving_average"
  )
