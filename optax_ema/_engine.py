"""The averaging engine: one pass over the leaves for every average of a state.

Every averaging transformation describes its averages as an :class:`Engine`
(the rule that moves each one, :mod:`optax_ema._rules`; debiasing, mask,
storage) and lets it do the work:

- :meth:`Engine.init` builds the averages from the params;
- :meth:`Engine.update` decides whether this step averages (the wrapped
  optimizer applied an update, every rule's gate holds, every decay given
  is in [0, 1], the step is finite), and if
  so moves every average in one pass over the leaves, inside a gate that
  leaves the buffers untouched on other steps
  (:func:`optax_ema._gate.skip_unless`: on GPU and TPU a ``while`` loop of
  zero or one iteration, elsewhere, and around averages in host memory on
  TPU, a ``lax.cond``); a decay check with no other gate to join is a select
  inside that pass instead (a gate of its own would cost a model-sized
  buffer on every step); it counts the step and, for a periodic
  overwrite, returns updates that move the params onto the average.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ema import _averages
from optax_ema import _gate
from optax_ema import _inner_state
from optax_ema import _offload
from optax_ema import _rounding
from optax_ema import _rules
from optax_ema import _storage
from optax_ema import _tree_utils
from optax_ema import _values


class Slot(NamedTuple):
  """The static description of one average: its rule, and whether it is debiased."""

  rule: _rules.Rule
  debias: bool = False

  @property
  def per_leaf(self) -> bool:
    return self.rule.per_leaf


class SlotState(NamedTuple):
  """One average as the engine works on it: its tree and debias weight."""

  tree: Any
  weight: jax.Array | None = None


class EngineState(NamedTuple):
  """Everything the engine keeps, however a transform's state lays it out."""

  slots: list[SlotState]
  counted: jax.Array  # int32: the updates applied so far (the state's count)
  step_sizes: list[jax.Array]  # per average: the last step's per-step weight


def step_leaf(
  average: Any,
  value: Any,
  step: _rules.StepSize,
  *,
  weight: jax.Array | None = None,
  stochastic: bool = False,
  seed: jax.Array | None = None,
  keep: jax.Array | None = None,
) -> Any:
  """One leaf of one averaging step: ``a - w (a - x)`` in at least float32.

  ``None``, masked-out and non-float leaves (ints, bools, PRNG keys: they
  follow the params, see :meth:`Engine._follow`) stay as they are. A step of
  ``w = 1``
  copies ``value`` exactly. A debiased average (``weight`` given) counts as
  zero until its weight is positive. The result is stored in the average's
  dtype, stochastically rounded when that is narrower and ``stochastic``.
  Where the scalar bool ``keep`` is given and False, the average comes back
  unchanged: a select fused into the same elementwise pass (no buffer of
  the leaf's size beyond the step's own).
  """
  if _tree_utils.is_none_or_masked(average) or not _tree_utils.is_float(average):
    return average
  compute = jnp.promote_types(average.dtype, jnp.float32)
  a = average.astype(compute)
  if weight is not None:
    a = jnp.where(weight > 0, a, jnp.zeros_like(a))
  v = _values.upcast_value(value, compute)
  w = step.weight(compute)
  exact = jnp.where(w == 1, v, a - (a - v) * w)
  new = _rounding.store(exact, average.dtype, stochastic, seed)
  return new if keep is None else jnp.where(keep, new, average)


def _next_weight(weight: jax.Array, w: jax.Array) -> jax.Array:
  """``1 - prod(decays)`` one step on: the average of a constant 1 from 0.

  Updated with the same rounding as the average itself (``c + (1 - c) w``
  rather than ``1 - (1 - c) d``), so that the debiased average of constant
  parameters is exact to float32 rounding.
  """
  return weight - (weight - 1.0) * w


class Engine(NamedTuple):
  """The static configuration of every average of one transformation.

  Attributes:
    slots: one :class:`Slot` per average. Their rules say when the averages
      move (:meth:`optax_ema._rules.Rule.gate`): the averages of one engine
      move together, on the steps where every rule's gate holds.
    storage: the averages' dtype, rounding and memory
      (:class:`optax_ema._storage.Storage`).
    mask: the averages' mask (a bool prefix tree, a callable, or ``None``).
    sequential: average ``params + updates`` (True) or ``params``.
    skip_nonfinite: a step with non-finite gradients or new params neither
      averages nor counts.
    overwrite_every: every this many real steps, return updates that move
      the params onto the average ``overwrite_slot`` (0: never).
    overwrite_slot: which average overwrites.
  """

  slots: tuple[Slot, ...]
  storage: _storage.Storage = _storage.Storage()
  mask: Any = None
  sequential: bool = True
  skip_nonfinite: bool = False
  overwrite_every: int = 0
  overwrite_slot: int = 0

  # -- init --------------------------------------------------------------------

  def init(self, params: Any) -> EngineState:
    """The averages (copies of ``params``), a zero count, step sizes of 1."""
    if _tree_utils.is_placeholder(params):
      # optax.tree_map_params: the averages are param-shaped; say so.
      weights = [jnp.zeros([], jnp.float32) if s.debias else None for s in self.slots]
      slots = [SlotState(params, w) for w in weights]
      ones = [jnp.ones([], jnp.float32) for _ in self.slots]
      return EngineState(slots, jnp.zeros([], jnp.int32), ones)
    if self.storage.offload:
      _offload.check_not_in_pmap()
    mask = _tree_utils.expand_mask(self.mask, params)
    slots, step_sizes = [], []
    for slot in self.slots:
      tree = _tree_utils.map_selected(self._init_leaf, mask, params)
      slot.rule.leaves(tree)  # a per-leaf tree that is not a prefix fails here
      n = len(jax.tree.leaves(tree))
      shape = [n] if slot.per_leaf else []
      weight = jnp.zeros(shape, jnp.float32) if slot.debias else None
      slots.append(SlotState(tree, weight))
      step_sizes.append(jnp.ones(shape, jnp.float32))
    return EngineState(slots, jnp.zeros([], jnp.int32), step_sizes)

  def _init_leaf(self, p: Any) -> Any:
    if _tree_utils.is_float(p):
      dtype = _values.default_ema_dtype(jnp.asarray(p).dtype, self.storage.dtype)
      copy = jnp.array(p, dtype=dtype, copy=True)  # explicit: never weak
      return _offload.to_host(copy) if self.storage.offload else copy
    if _tree_utils.is_key(p):
      data = jnp.array(jax.random.key_data(p), copy=True)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(p))
    # An explicit dtype: a Python scalar leaf would otherwise be stored
    # weakly typed and change type (and retrace) after the first update.
    return jnp.array(p, dtype=jnp.asarray(p).dtype, copy=True)

  # -- update ------------------------------------------------------------------

  def update(
    self,
    state: EngineState,
    *,
    params: Any,
    grads: Any,
    updates: Any,
    inner_before: Any,
    inner_after: Any,
  ) -> tuple[EngineState, Any]:
    """One step: average if this step averages, count it, maybe overwrite.

    Returns the new state and the updates to apply (the wrapped optimizer's,
    or the overwrite's).
    """
    if self.storage.offload:
      _offload.check_not_in_pmap()
    slots, count, step_sizes = state
    reference = slots[0].tree
    values = _values.latest_values(reference, params, updates, self.sequential)
    finite = None
    if self.skip_nonfinite:
      finite = _values.all_finite(grads) & _values.all_finite(values)
    real = _rules.all_of(_inner_state.applied_update(inner_before, inner_after), finite)
    # A decay known only now (traced, or a schedule's value) outside [0, 1]
    # or NaN: the step does not average, and records a NaN step size.
    valid = [s.rule.valid(count) for s in self.slots]
    would = _rules.all_of(real, *(s.rule.gate(count) for s in self.slots))
    # Where no other gate exists, the check creates none: it is a select in
    # the per-leaf pass (a gate would take the new params as an operand, a
    # buffer the size of the model); else it joins that gate's predicate.
    keep = _rules.all_of(*valid) if would is None else None
    moves = None if would is None else _rules.all_of(would, *valid)

    if moves is None:
      new_slots, new_sizes = self._average(slots, step_sizes, values, count, keep)
    else:
      # Steps that do not average skip the pass: no average memory is read
      # or written. Only the new params go in, already formed: params and
      # updates as operands made XLA copy both.
      new_slots, new_sizes = _gate.skip_unless(
        moves,
        lambda carry, v, c: self._average(carry[0], carry[1], v, c),
        (slots, step_sizes),
        values,
        count,
        host_memory=self.storage.offload,
      )
    new_sizes = [
      z if ok is None else jnp.where(~ok if would is None else ~ok & would, jnp.nan, z)
      for z, ok in zip(new_sizes, valid, strict=True)
    ]
    new_slots = [self._follow(s, values, real) for s in new_slots]
    new_count = optax.safe_increment(count)
    if real is not None:
      new_count = jnp.where(real, new_count, count)
    out_updates = updates
    if self.overwrite_every:
      now = _rules.all_of(real, *valid, (count + 1) % self.overwrite_every == 0)
      assert now is not None  # a traced flag: `count` is traced
      slot = new_slots[self.overwrite_slot]
      out_updates = self._overwrite(now, updates, slot, params)
    return EngineState(new_slots, new_count, new_sizes), out_updates

  def _follow(self, slot: SlotState, values: Any, real: jax.Array | None) -> SlotState:
    """Non-float leaves are not averaged: they take the latest value of a step.

    Outside the conditional, so that they follow every step that counts,
    also those that do not average (they are small: counters, PRNG keys).
    """

    def leaf(a: Any, v: Any) -> Any:
      if _tree_utils.is_none_or_masked(a) or _tree_utils.is_float(a):
        return a
      new = v if _tree_utils.is_key(a) else jnp.asarray(v).astype(a.dtype)
      return new if real is None else jax.lax.select(real, new, a)

    tree = jax.tree.map(leaf, slot.tree, values, is_leaf=_tree_utils.is_none_or_masked)
    return slot._replace(tree=tree)

  def _average(
    self,
    slots: list[SlotState],
    step_sizes: list[jax.Array],
    values: Any,
    count: jax.Array,
    keep: jax.Array | None = None,
  ) -> tuple[list[SlotState], list[jax.Array]]:
    """Moves every average one step, in a single pass over the leaves.

    Where ``keep`` is given and False, nothing moves: the averages, debias
    weights and step sizes stay as they are (selects, not a gate).
    """
    value_leaves = _tree_utils.flatten(slots[0].tree)[1].flatten_up_to(values)
    last: list[Any] = [None]  # the offloaded leaf moved last, of any average
    out = [
      self._average_slot(j, state, value_leaves, count, keep, last)
      for j, state in enumerate(slots)
    ]
    sizes = [w for _, w in out]
    if keep is not None:
      sizes = [jnp.where(keep, w, z) for w, z in zip(sizes, step_sizes, strict=True)]
    return [s for s, _ in out], sizes

  def _step_sizes(self, j: int, reference: Any, count: jax.Array) -> list[Any]:
    """The step size of average ``j`` at each leaf (one per distinct rule)."""
    cache: dict[int, _rules.StepSize] = {}
    rules = self.slots[j].rule.leaves(reference)
    for r in rules:
      if id(r) not in cache:
        cache[id(r)] = r.step(count)
    return [cache[id(r)] for r in rules]

  def _average_slot(
    self,
    j: int,
    state: SlotState,
    value_leaves: list[Any],
    count: jax.Array,
    keep: jax.Array | None,
    last: list[Any],
  ) -> tuple[SlotState, jax.Array]:
    """Average ``j`` one step on, and its per-step step size.

    ``last`` holds the offloaded leaf moved last (this updates it): each
    offloaded leaf is moved after it (see :mod:`optax_ema._offload`).
    """
    slot = self.slots[j]
    leaves, treedef = _tree_utils.flatten(state.tree)
    steps = self._step_sizes(j, state.tree, count)
    arrays = [i for i, a in enumerate(leaves) if not _tree_utils.is_none_or_masked(a)]
    position = {i: k for k, i in enumerate(arrays)}  # among jax.tree.leaves
    stochastic = self.storage.stochastic is not False
    new_leaves = []
    for i, (a, v) in enumerate(zip(leaves, value_leaves, strict=True)):
      weight = state.weight
      if slot.per_leaf and weight is not None and i in position:
        weight = weight[position[i]]  # one debias weight per array leaf
      rounds = stochastic and _tree_utils.is_float(a) and a.dtype.itemsize < 4
      kwargs: dict[str, Any] = dict(
        weight=weight,
        stochastic=rounds,
        seed=_rounding.rounding_seed(count, i, j) if rounds else None,
        keep=keep,
      )
      if self.storage.offload and _tree_utils.is_float(a):
        new = _offload.step_offloaded(step_leaf, a, v, last[0], steps[i], **kwargs)
        last[0] = new
      else:
        new = step_leaf(a, v, steps[i], **kwargs)
      new_leaves.append(new)
    if slot.per_leaf:
      sizes = [steps[i].weight(jnp.float32) for i in arrays]
      w = jnp.stack(sizes) if sizes else jnp.zeros([0], jnp.float32)
    else:
      # One rule for every leaf; asked directly when there is no leaf.
      step = steps[0] if steps else slot.rule.step(count)
      w = step.weight(jnp.float32)
    weight = state.weight
    if weight is not None:
      moved = _next_weight(weight, w)
      weight = moved if keep is None else jnp.where(keep, moved, weight)
    new_state = SlotState(treedef.unflatten(new_leaves), weight)
    return new_state, slot.rule.per_step(w)

  def _overwrite(
    self, now: jax.Array, updates: Any, slot: SlotState, params: Any
  ) -> Any:
    """Updates that move the params onto the (debiased) average ``slot`` if ``now``.

    In device memory a select per leaf: it fuses into the wrapped optimizer's
    update, where a gate would keep the updates in a buffer of their own.
    Averages in host memory are brought over only when ``now`` holds: there
    the whole overwrite is gated (see :mod:`optax_ema._gate`).
    """
    if self.storage.offload:
      return _gate.skip_unless(
        now,
        lambda u, s, p: self._overwritten(u, s, p),
        updates,
        slot,
        params,
        host_memory=True,
      )
    return self._overwritten(updates, slot, params, now)

  def _overwritten(
    self, updates: Any, slot: SlotState, params: Any, now: jax.Array | None = None
  ) -> Any:
    average = _offload.tree_to_device(slot.tree)
    if slot.weight is not None:
      average = _averages.debiased_value(average, slot.weight)

    def leaf(a: Any, u: Any, p: Any) -> Any:
      if _tree_utils.is_none_or_masked(a) or not _tree_utils.is_float(a):
        return u
      if u is None or not _tree_utils.is_float(u):
        return u
      onto = (a.astype(p.dtype) - p).astype(u.dtype)
      return onto if now is None else jax.lax.select(now, onto, u)

    return jax.tree.map(
      leaf, average, updates, params, is_leaf=_tree_utils.is_none_or_masked
    )
