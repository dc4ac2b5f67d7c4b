"""Averaging rules: how far each step moves an average towards the params.

Every averaging transform of the package moves its average by

.. math::

  \\bar{x} \\leftarrow \\bar{x} - w\\,(\\bar{x} - x), \\qquad w = 1 - d,

and differs only in the step size :math:`w` it takes at each step: TFA's
clamped decay, a decay schedule, one decay per leaf, EDM2's power profile,
SWA's running mean. A rule maps the count of updates applied so far to a
:class:`StepSize`. The precision an average needs is in :math:`w`, not in
:math:`d`: where a rule can compute :math:`w` without forming :math:`1 - d`
from a float32 number near one (``expm1``/``log1p``), it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_ema import _power_math
from optax_ema import _tree_utils


class StepSize(NamedTuple):
  """The step size of one averaging step: ``w = 1 - decay``.

  Attributes:
    decay: float32, the decay, as TFA computes it.
    exact: float32 ``w`` where the rule computes it directly (more precise
      than ``1 - decay`` for decays near one), else ``None``: the average's
      own compute dtype then forms ``1 - decay``, as TFA does.
    mean_of: for a running mean (SWA), the int32 number of values the mean
      holds after this step: ``w = 1 / mean_of``, formed in the average's
      own compute dtype (exact in float64 too).
  """

  decay: jax.Array
  exact: jax.Array | None = None
  mean_of: jax.Array | None = None

  def weight(self, dtype: Any = jnp.float32) -> jax.Array:
    """``w`` in ``dtype``."""
    if self.mean_of is not None:
      return 1 / self.mean_of.astype(dtype)
    if self.exact is not None:
      return self.exact.astype(dtype)
    return 1 - self.decay.astype(dtype)


Rule = Callable[[jax.Array], StepSize]


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


def _ramp(steps: jax.Array) -> jax.Array:
  """TF's ``(1 + t) / (10 + t)``, in float32."""
  return (1.0 + steps) / (10.0 + steps)


def decay_rule(
  average_decay: Any,
  *,
  num_updates: Any = None,
  start_step: Any = 0,
  dynamic_decay: bool = False,
) -> Rule:
  """TFA's rule for one decay (a number, a traced scalar or a schedule).

  ``min(decay, (1 + n) / (10 + n))`` with ``num_updates=n``; before
  ``start_step`` updates, 0 (the average copies the params); with
  ``dynamic_decay``, at most ``(1 + t - s) / (10 + t - s)``. Decays are
  computed in float32, as TFA does; a schedule with a ``step_size``
  attribute (those of :mod:`optax_ema.schedules`) also gives ``w`` exactly.
  """
  fixed_start = isinstance(start_step, int) and start_step == 0
  schedule = average_decay if callable(average_decay) else None

  def rule(count: jax.Array) -> StepSize:
    if schedule is not None:
      decay = jnp.asarray(schedule(count), jnp.float32)
      precise = getattr(schedule, "step_size", None)
      exact = None if precise is None else jnp.asarray(precise(count), jnp.float32)
    else:
      decay, exact = jnp.asarray(average_decay, jnp.float32), None
    clamps = []
    if num_updates is not None:
      clamps.append(_ramp(jnp.asarray(num_updates, jnp.float32)))
    step = jnp.asarray(count).astype(jnp.float32)
    start = jnp.asarray(start_step, jnp.float32)
    if dynamic_decay:
      clamps.append(_ramp(step - start))
    for clamp in clamps:
      decay = jnp.minimum(decay, clamp)
      if exact is not None:
        exact = jnp.maximum(exact, 1.0 - clamp)
    if not fixed_start:
      before = step < start
      decay = jnp.where(before, jnp.zeros_like(decay), decay)
      if exact is not None:
        exact = jnp.where(before, jnp.ones_like(exact), exact)
    return StepSize(decay, exact)

  return rule


def power_rule(gamma: float) -> Rule:
  """EDM2's power profile: ``w = 1 - (1 - 1/t) ** (gamma + 1)``, ``t = count + 1``."""

  def rule(count: jax.Array) -> StepSize:
    return StepSize(
      _power_math.power_decay(count, gamma), _power_math.power_weight(count, gamma)
    )

  return rule


def swa_rule(
  start_averaging: Any, average_period: Any
) -> tuple[Rule, Callable[[jax.Array], jax.Array]]:
  """SWA's running mean: ``(rule, moves)``.

  Before ``start_averaging`` updates the average copies the params
  (``w = 1``); at every ``average_period``-th update from there it takes a
  snapshot into the mean of the ``k`` already in it (``w = 1 / (k + 1)``);
  it does not move on other steps (``moves`` is False there).
  """

  def schedule(count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    since = jnp.asarray(count, jnp.int32) - start_averaging
    before = since < 0
    since = jnp.maximum(since, 0)
    return before, since % average_period == 0, since // average_period

  def rule(count: jax.Array) -> StepSize:
    before, _, k = schedule(count)
    mean_of = jnp.where(before, 1, k + 1).astype(jnp.int32)
    return StepSize(1.0 - 1.0 / mean_of.astype(jnp.float32), None, mean_of)

  def moves(count: jax.Array) -> jax.Array:
    before, snapshot, _ = schedule(count)
    return before | snapshot

  return rule, moves


def interval_step(rule: Rule, count: jax.Array, k: int) -> StepSize:
  """The step size over the ``k`` updates ``count - k + 1 .. count``.

  ``1 - prod(1 - w_i)``, computed as ``-expm1(sum(log1p(-w_i)))`` so that
  it keeps its precision when every ``w_i`` is small: averaging every k-th
  step by the product of the k decays keeps the window in steps.
  """
  if k == 1:
    return rule(count)
  steps = count - (k - 1) + jnp.arange(k, dtype=count.dtype)
  sizes = jax.vmap(rule)(steps)
  log_keep = jnp.sum(jnp.log1p(-sizes.weight(jnp.float32)))
  return StepSize(jnp.prod(sizes.decay), -jnp.expm1(log_keep))  # never a mean


def _given_decays(spec: Any, count: jax.Array, k: int) -> jax.Array | None:
  """The decay ``spec`` gives over the ``k`` updates up to ``count``.

  ``None`` for a constant (range-checked when the transform was built) and
  for the specs of rules that are not decays (power profiles, SWA's mean).
  """
  if callable(spec):
    if k == 1:
      return jnp.asarray(spec(count), jnp.float32)
    counts = count - (k - 1) + jnp.arange(k, dtype=count.dtype)
    return jnp.asarray(jax.vmap(spec)(counts), jnp.float32)
  if _tree_utils.is_traced(spec):
    return jnp.asarray(spec, jnp.float32)
  return None


def decays_valid(decay: Any, count: jax.Array, k: int) -> jax.Array | None:
  """Whether every decay of one average is in [0, 1] for this step.

  A decay known only in the step (traced by ``optax.inject_hyperparams`` or
  ``jit``, or a schedule's value, checked at construction only at
  :data:`~optax_ema._validation.SAMPLED_COUNTS`) can leave [0, 1] or be
  NaN: the step then does not average (the engine's gate) and records a NaN
  step size. It is the value given that is checked, before the clamps of
  ``num_updates`` and ``dynamic_decay``. ``None`` when every decay is a
  constant, checked at construction.
  """
  specs = decay.prefix if isinstance(decay, PerLeafDecay) else decay
  flags = []
  for spec in jax.tree.leaves(specs, is_leaf=callable):
    given = _given_decays(spec, count, k)
    if given is not None:
      flags.append(jnp.all((given >= 0.0) & (given <= 1.0)))  # NaN: False
  if not flags:
    return None
  out = flags[0]
  for flag in flags[1:]:
    out = out & flag
  return out


def per_step(w: jax.Array, k: Any) -> jax.Array:
  """The per-step ``w`` equivalent to ``w`` applied once every ``k`` steps."""
  if isinstance(k, int) and k == 1:
    return w
  return -jnp.expm1(jnp.log1p(-w) / jnp.asarray(k, jnp.float32))


def leaf_rules(decay: Any, tree: Any, make: Callable[[Any], Rule]) -> list[Rule]:
  """One rule per leaf of ``tree`` (flattened with None/MaskedNode as leaves).

  ``decay`` is one decay spec, or a :class:`PerLeafDecay` prefix of them;
  ``make`` turns one spec into a rule.
  """
  leaves = _tree_utils.leaves_with_paths(tree)
  if not isinstance(decay, PerLeafDecay):
    rule = make(decay)
    return [rule] * len(leaves)
  try:
    full = jax.tree.map(
      lambda d, sub: jax.tree.map(
        lambda _: d, sub, is_leaf=_tree_utils.is_none_or_masked
      ),
      decay.prefix,
      tree,
      is_leaf=callable,
    )
  except ValueError as err:
    raise ValueError(
      "`average_decay` per_leaf tree must be a pytree prefix of the params "
      f"(a decay or schedule where a whole subtree shares it): {err}"
    ) from None
  specs = jax.tree.leaves(full, is_leaf=callable)
  made: dict[int, Rule] = {}
  return [made.setdefault(id(s), make(s)) for s in specs]
