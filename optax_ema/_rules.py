"""Averaging rules: how far each step moves an average towards the params.

Every averaging transform of the package moves its average by

.. math::

  \\bar{x} \\leftarrow \\bar{x} - w\\,(\\bar{x} - x), \\qquad w = 1 - d,

and differs only in its :class:`Rule`: the step size :math:`w` it takes
after a given count of updates (TFA's clamped decay, a decay schedule,
EDM2's power profile, SWA's running mean), and on which updates it moves
at all (SWA's snapshots; :class:`Every` k-th update; :class:`PerLeaf` rules
give each parameter subtree its own). The precision an average needs is in
:math:`w`, not in :math:`d`: where a rule can compute :math:`w` without
forming :math:`1 - d` from a float32 number near one (``expm1``/``log1p``),
it does.
"""

from __future__ import annotations

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


def all_of(*flags: jax.Array | None) -> jax.Array | None:
  """Conjunction of scalar bools; ``None`` stands for a static True."""
  out = None
  for flag in flags:
    if flag is not None:
      out = flag if out is None else out & flag
  return out


class Rule:
  """How one average moves: its step size, and on which steps it moves.

  The engine asks a rule, at the count of updates applied before this one,
  for the :meth:`step` to take, whether this step averages at all
  (:meth:`gate`), whether the decays it was given are usable (:meth:`valid`)
  and what one of its steps means per update (:meth:`per_step`). Rules
  compose: :class:`Every` makes any rule move every k-th update only,
  :class:`PerLeaf` gives each parameter subtree its own rule.

  Attributes:
    interval: the updates one averaging step stands for (an int, or an int32
      scalar traced by ``optax.inject_hyperparams``).
    per_leaf: whether the rule differs between leaves (:meth:`leaves`).
  """

  interval: Any = 1
  per_leaf = False

  def step(self, count: jax.Array) -> StepSize:
    """The step size of an averaging step after ``count`` updates."""
    raise NotImplementedError

  def gate(self, count: jax.Array) -> jax.Array | None:
    """Whether this step averages; ``None``: every step does."""
    del count
    return None

  def valid(self, count: jax.Array) -> jax.Array | None:
    """Whether every decay given is in [0, 1] now; ``None``: checked when built."""
    del count
    return None

  def per_step(self, w: jax.Array) -> jax.Array:
    """The per-update weight equivalent to one step of ``w``."""
    return per_step(w, self.interval)

  def leaves(self, tree: Any) -> list[Rule]:
    """One rule per leaf of ``tree`` (flattened with None/MaskedNode as leaves)."""
    return [self] * len(_tree_utils.leaves_with_paths(tree))


class Decay(Rule):
  """TFA's rule for one decay (a number, a traced scalar or a schedule).

  ``min(decay, (1 + n) / (10 + n))`` with ``num_updates=n``; before
  ``start_step`` updates, 0 (the average copies the params); with
  ``dynamic_decay``, at most ``(1 + t - s) / (10 + t - s)``. Decays are
  computed in float32, as TFA does; a schedule with a ``step_size``
  attribute (those of :mod:`optax_ema.schedules`) also gives ``w`` exactly.
  A decay known only in the step (traced, or a schedule's value) is
  checked there (:meth:`valid`).
  """

  def __init__(
    self,
    decay: Any,
    *,
    num_updates: Any = None,
    start_step: Any = 0,
    dynamic_decay: bool = False,
  ) -> None:
    self.decay = decay
    self.num_updates, self.start_step = num_updates, start_step
    self.dynamic_decay = dynamic_decay

  def _given(self, count: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The decay given for ``count`` (float32), and its exact ``w`` if known."""
    schedule = self.decay if callable(self.decay) else None
    if schedule is None:
      return jnp.asarray(self.decay, jnp.float32), None
    decay = jnp.asarray(schedule(count), jnp.float32)
    precise = getattr(schedule, "step_size", None)
    exact = None if precise is None else jnp.asarray(precise(count), jnp.float32)
    return decay, exact

  def step(self, count: jax.Array) -> StepSize:
    decay, exact = self._given(count)
    clamps = []
    if self.num_updates is not None:
      clamps.append(_ramp(jnp.asarray(self.num_updates, jnp.float32)))
    step = jnp.asarray(count).astype(jnp.float32)
    start = jnp.asarray(self.start_step, jnp.float32)
    if self.dynamic_decay:
      clamps.append(_ramp(step - start))
    for clamp in clamps:
      decay = jnp.minimum(decay, clamp)
      if exact is not None:
        exact = jnp.maximum(exact, 1.0 - clamp)
    if not (isinstance(self.start_step, int) and self.start_step == 0):
      before = step < start
      decay = jnp.where(before, jnp.zeros_like(decay), decay)
      if exact is not None:
        exact = jnp.where(before, jnp.ones_like(exact), exact)
    return StepSize(decay, exact)

  def valid(self, count: jax.Array) -> jax.Array | None:
    # It is the value given that is checked, before the clamps of
    # num_updates and dynamic_decay; a constant was checked when built.
    if not (callable(self.decay) or _tree_utils.is_traced(self.decay)):
      return None
    given = self._given(count)[0]
    return (given >= 0.0) & (given <= 1.0)  # NaN: False


class Power(Rule):
  """EDM2's power profile: ``w = 1 - (1 - 1/t) ** (gamma + 1)``, ``t = count + 1``."""

  def __init__(self, gamma: float) -> None:
    self.gamma = gamma

  def step(self, count: jax.Array) -> StepSize:
    return StepSize(
      _power_math.power_decay(count, self.gamma),
      _power_math.power_weight(count, self.gamma),
    )


class RunningMean(Rule):
  """SWA's running mean of snapshots.

  Before ``start_averaging`` updates the average copies the params
  (``w = 1``); at every ``average_period``-th update from there it takes a
  snapshot into the mean of the ``k`` already in it (``w = 1 / (k + 1)``);
  it does not move on other updates (:meth:`gate`). One step stands for
  ``average_period`` updates.
  """

  def __init__(self, start_averaging: Any, average_period: Any) -> None:
    self.start, self.interval = start_averaging, average_period

  def _since(self, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    since = jnp.asarray(count, jnp.int32) - self.start
    return since < 0, jnp.maximum(since, 0)

  def step(self, count: jax.Array) -> StepSize:
    before, since = self._since(count)
    mean_of = jnp.where(before, 1, since // self.interval + 1).astype(jnp.int32)
    return StepSize(1.0 - 1.0 / mean_of.astype(jnp.float32), None, mean_of)

  def gate(self, count: jax.Array) -> jax.Array:
    before, since = self._since(count)
    return before | (since % self.interval == 0)


class Every(Rule):
  """``rule``, moving on every ``k``-th update only, by the ``k`` updates' product.

  The step after update ``count + 1`` with ``(count + 1) % k == 0`` takes
  ``1 - prod(1 - w_i)`` over the updates ``count - k + 1 .. count``,
  computed as ``-expm1(sum(log1p(-w_i)))`` so that it keeps its precision
  when every ``w_i`` is small: the window in updates does not change.
  """

  def __init__(self, rule: Rule, k: int) -> None:
    self.rule, self.k = rule, k
    self.interval = k * rule.interval
    self.per_leaf = rule.per_leaf

  def _counts(self, count: jax.Array) -> jax.Array:
    return count - (self.k - 1) + jnp.arange(self.k, dtype=count.dtype)

  def step(self, count: jax.Array) -> StepSize:
    sizes = jax.vmap(self.rule.step)(self._counts(count))
    log_keep = jnp.sum(jnp.log1p(-sizes.weight(jnp.float32)))
    return StepSize(jnp.prod(sizes.decay), -jnp.expm1(log_keep))  # never a mean

  def gate(self, count: jax.Array) -> jax.Array | None:
    return all_of((count + 1) % self.k == 0, self.rule.gate(count))

  def valid(self, count: jax.Array) -> jax.Array | None:
    flags = jax.vmap(self.rule.valid)(self._counts(count))
    return None if flags is None else jnp.all(flags)

  def leaves(self, tree: Any) -> list[Rule]:
    made: dict[int, Rule] = {}
    return [made.setdefault(id(r), Every(r, self.k)) for r in self.rule.leaves(tree)]


class PerLeaf(Rule):
  """One rule per parameter subtree: ``prefix``, a pytree prefix of rules."""

  per_leaf = True

  def __init__(self, prefix: Any) -> None:
    self.prefix = prefix

  def _rules(self) -> list[Rule]:
    return jax.tree.leaves(self.prefix, is_leaf=lambda x: isinstance(x, Rule))

  def step(self, count: jax.Array) -> StepSize:
    raise TypeError("a per-leaf rule has one step per leaf: use `leaves`.")

  def valid(self, count: jax.Array) -> jax.Array | None:
    return all_of(*(r.valid(count) for r in self._rules()))

  def leaves(self, tree: Any) -> list[Rule]:
    is_rule = lambda x: isinstance(x, Rule)
    try:
      full = jax.tree.map(
        lambda r, sub: jax.tree.map(
          lambda _: r, sub, is_leaf=_tree_utils.is_none_or_masked
        ),
        self.prefix,
        tree,
        is_leaf=is_rule,
      )
    except ValueError as err:
      raise ValueError(
        "`average_decay` per_leaf tree must be a pytree prefix of the params "
        f"(a decay or schedule where a whole subtree shares it): {err}"
      ) from None
    return jax.tree.leaves(full, is_leaf=is_rule)


def decay_rule(decay: Any, **clamps: Any) -> Rule:
  """The rule of one ``average_decay`` entry: a decay, or a per-leaf tree of them.

  ``clamps`` are :class:`Decay`'s ``num_updates``, ``start_step`` and
  ``dynamic_decay``; each distinct decay object of a per-leaf tree makes
  one rule, shared by the leaves it covers.
  """
  if not isinstance(decay, PerLeafDecay):
    return Decay(decay, **clamps)
  made: dict[int, Rule] = {}
  prefix = jax.tree.map(
    lambda d: made.setdefault(id(d), Decay(d, **clamps)), decay.prefix, is_leaf=callable
  )
  return PerLeaf(prefix)


def per_step(w: jax.Array, k: Any) -> jax.Array:
  """The per-step ``w`` equivalent to ``w`` applied once every ``k`` steps."""
  if isinstance(k, int) and k == 1:
    return w
  return -jnp.expm1(jnp.log1p(-w) / jnp.asarray(k, jnp.float32))
