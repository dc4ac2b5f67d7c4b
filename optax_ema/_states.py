"""The state types of the averaging transformations, and their layouts.

Each state type is declared here with its :class:`Layout`, the one place
that knows its fields: how the engine's averages are packed into it and
unpacked from it (:meth:`Layout.pack`, :meth:`Layout.unpack`), and how
readers see it (:meth:`Layout.views`, :meth:`Layout.count`,
:meth:`Layout.inner`, :meth:`Layout.stored`). Readers
(:mod:`optax_ema._reading`, :mod:`optax_ema._upgrade`, ``compat``,
``posthoc``) find a state's layout with :func:`layout_of` and never name a
field; the transformations import their state types from here.
"""

from __future__ import annotations

from typing import Any
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _averages
from optax_ema import _engine
from optax_ema import _offload
from optax_ema import _power_math
from optax_ema import _rules


class View(NamedTuple):
  """One average of a state, as the readers see it."""

  key: Any
  value: Any  # what `which=` may name it by: a constant decay, a sigma_rel
  tree: Any  # the averaged params (debiased), MaskedNode where not averaged
  step_size: jax.Array  # per-step weight of the last averaging step
  empty: jax.Array | None = None  # debiased and nothing averaged yet (per leaf)


def _tracked(views: list[View]) -> str:
  return ", ".join(f"{v.value!r}" for v in views)


class Layout:
  """How one state type holds the engine's averages, and how it is read.

  Every state is ``(inner_state, averages..., count, ...)``: the wrapped
  optimizer's state first, the count of updates applied third. An instance
  carries what one transformation's states share (their keys), for
  :meth:`pack` and :meth:`unpack`; the readers' methods are class methods,
  which read everything from the state itself.
  """

  state_type: ClassVar[type]
  noun: ClassVar[str] = "decay"  # what a view's value is, for `which=`
  single_takes_which: ClassVar[bool] = False  # `which` may pick the only one
  # Fields added since optax_ema 0.1.0, with what an older state means for
  # them (a step size not recorded).
  added: ClassVar[dict[str, float]] = {}

  def pack(self, inner_state: Any, averages: _engine.EngineState) -> Any:
    raise NotImplementedError

  def unpack(self, state: Any) -> tuple[Any, _engine.EngineState]:
    raise NotImplementedError

  @classmethod
  def inner(cls, state: Any) -> Any:
    """The wrapped optimizer's state."""
    return state[0]

  @classmethod
  def count(cls, state: Any) -> Any:
    """The count of updates applied."""
    return state[2]

  @classmethod
  def stored(cls, state: Any) -> Any:
    """The averages as the state stores them."""
    return state[1]

  @classmethod
  def replace(cls, state: Any, inner: Any, stored: Any, count: Any) -> Any:
    """``state`` with its inner state, stored averages and count replaced."""
    return type(state)(inner, stored, count, *state[3:])

  @classmethod
  def fields(cls) -> tuple[str, ...]:
    """The state type's field names."""
    return tuple(getattr(cls.state_type, "_fields"))  # noqa: B009

  @classmethod
  def restored_fields(cls) -> set[str]:
    """The fields of a state restored without a target, in any version."""
    return set(cls.fields()) - set(cls.added)

  @classmethod
  def views(cls, state: Any) -> list[View]:
    """One :class:`View` per average."""
    raise NotImplementedError

  @classmethod
  def missing_which(cls, views: list[View]) -> str:
    """The error for a state of several averages read without `which`."""
    raise NotImplementedError

  @classmethod
  def hint(cls, views: list[View]) -> str:
    """What to add to an error for a `which` that names no average."""
    return ""


LAYOUTS: dict[type, type[Layout]] = {}


def _register(layout: type[Layout]) -> type[Layout]:
  LAYOUTS[layout.state_type] = layout
  return layout


def layout_of(state: Any) -> type[Layout]:
  """The layout of an averaging state."""
  return LAYOUTS[type(state)]


def is_average_state(x: Any) -> bool:
  return isinstance(x, tuple(LAYOUTS))


def _slot(tree: Any) -> _engine.SlotState:
  if isinstance(tree, _averages.DebiasedAverage):
    return _engine.SlotState(tree.average, tree.weight)
  return _engine.SlotState(tree)


class MovingAverageState(NamedTuple):
  """State of :func:`moving_average`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    average: the moving average of the parameters, a tree with the structure
      of the parameters. Floating point leaves hold the average (in float32
      for float16/bfloat16 parameters unless ``ema_dtype`` says otherwise);
      non-float leaves hold the latest parameter value; masked-out leaves are
      ``optax.MaskedNode()`` and ``None`` leaves stay ``None``. With several
      decays an :class:`optax_ema.Averages` (one such tree per decay), with
      ``debias=True`` a :class:`optax_ema.DebiasedAverage`; read it with
      :func:`optax_ema.averaged_params` in every case.
    count: int32 scalar, the number of updates the wrapped optimizer applied
      so far (saturating): micro-steps of ``optax.MultiSteps``, steps that
      ``optax.apply_if_finite`` rejected and steps skipped by
      ``skip_nonfinite`` do not count.
    step_size: float32, the weight the last averaging step gave the new
      parameters, per step (``1 - decay``; with ``update_every=k`` the
      per-step equivalent of the step taken), 1 before any: what
      :func:`optax_ema.diagnostics` reports as the decay and the window;
      NaN after a step whose decay, known only in the step, was outside
      [0, 1] (that step did not average, but counted). A scalar, a vector
      (one entry per array leaf, as the debias weight) for
      per-leaf decays, a tuple of those with several decays.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), average_decay=0.5)
    >>> state = tx.init({"w": jnp.array([2.0])})
    >>> grads, params = {"w": jnp.array([1.0])}, {"w": jnp.array([2.0])}
    >>> _, state = tx.update(grads, state, params)
    >>> average, step_size = state.average["w"][0], state.step_size
    >>> print(int(state.count), f"{average:.2f} {step_size:.2f}")
    1 1.50 0.50
  """

  inner_state: optax.OptState
  average: optax.Params
  # `count` shadows tuple.count, as in optax's states; the field name is the
  # layout of users' checkpoints.
  count: jax.Array  # type: ignore[assignment]
  step_size: Any


# Declared here, named where users import it from (and where pickles and
# earlier versions look it up).
MovingAverageState.__module__ = "optax_ema._moving_average"


@_register
class MovingAverageLayout(Layout):
  """:class:`MovingAverageState`: one average, or :class:`~optax_ema.Averages`."""

  state_type = MovingAverageState
  added: ClassVar[dict[str, float]] = {"step_size": np.nan}

  def __init__(self, keys: tuple[Any, ...], decays: Any, several: bool) -> None:
    self.keys, self.several = keys, several
    self.labels = tuple(_averages.decay_label(d) for d in decays)

  def pack(self, inner_state: Any, averages: _engine.EngineState) -> MovingAverageState:
    slots, count, step_sizes = averages
    trees = [
      s.tree if s.weight is None else _averages.DebiasedAverage(s.tree, s.weight)
      for s in slots
    ]
    if self.several:
      average = _averages.Averages(trees, self.keys, self.labels)
      return MovingAverageState(inner_state, average, count, tuple(step_sizes))
    return MovingAverageState(inner_state, trees[0], count, step_sizes[0])

  @staticmethod
  def _entries(state: MovingAverageState) -> tuple[list[Any], list[Any]]:
    """The stored trees and their step sizes, one per average."""
    if isinstance(state.average, _averages.Averages):
      return list(state.average.averages), list(state.step_size)
    return [state.average], [state.step_size]

  def unpack(self, state: MovingAverageState) -> tuple[Any, _engine.EngineState]:
    trees, sizes = self._entries(state)
    slots = [_slot(t) for t in trees]
    return self.inner(state), _engine.EngineState(slots, self.count(state), sizes)

  @classmethod
  def views(cls, state: MovingAverageState) -> list[View]:
    trees, sizes = cls._entries(state)
    stored = cls.stored(state)
    several = isinstance(stored, _averages.Averages)
    keys = list(stored.keys) if several else [0]
    values = list(stored.decays) if several else [None]
    out = []
    for key, value, tree, size in zip(keys, values, trees, sizes, strict=True):
      slot = _slot(tree)
      average, empty = _offload.tree_to_device(slot.tree), None
      if slot.weight is not None:
        empty = jnp.asarray(slot.weight) == 0
        average = _averages.debiased_value(average, slot.weight)
      out.append(View(key, value, average, size, empty))
    return out

  @classmethod
  def missing_which(cls, views: list[View]) -> str:
    choices = _averages.describe_choices(
      [v.key for v in views], [v.value for v in views], "decay"
    )
    return (
      f"This state keeps {len(views)} averages (one per decay); pass `which=` "
      f"one of: {choices}."
    )


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
    >>> params = {"w": jnp.zeros(2, jnp.bfloat16)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.10, 0.05))
    >>> state = tx.init(params)
    >>> print(type(state).__name__, list(state.averages), int(state.count))
    PowerEmaState ['0.05', '0.1'] 0
    >>> print(state.averages["0.05"]["w"].dtype)
    float32
  """

  inner_state: optax.OptState
  averages: dict[str, optax.Params]
  # `count` shadows tuple.count, as in optax's states; the field name is the
  # layout of users' checkpoints.
  count: jax.Array  # type: ignore[assignment]


# Declared here, named where users import it from (and where pickles and
# earlier versions look it up).
PowerEmaState.__module__ = "optax_ema._power_ema"


def sigma_rel_key(sigma_rel: float) -> str:
  """The key of a profile in :attr:`PowerEmaState.averages`."""
  return repr(float(sigma_rel))


def _power_step_size(count: jax.Array, sigma_rel: float) -> jax.Array:
  """A profile's per-step weight of its last step, from the count (1 before any)."""
  count = jnp.asarray(count)
  rule = _rules.Power(_power_math.sigma_rel_to_gamma(sigma_rel))
  w = rule.step(jnp.maximum(count - 1, 0)).weight(jnp.float32)
  return jnp.where(count > 0, w, 1.0)


@_register
class PowerEmaLayout(Layout):
  """:class:`PowerEmaState`: a dict of profiles by sigma_rel; no step sizes.

  A profile's step size follows from the count: it is not stored, and is
  derived in one place (:func:`_power_step_size`) for the engine and the
  readers.
  """

  state_type = PowerEmaState
  noun = "sigma_rel"
  single_takes_which = True

  def __init__(self, sigma_rels: tuple[float, ...]) -> None:
    self.sigma_rels = sigma_rels
    self.keys = tuple(sigma_rel_key(s) for s in sigma_rels)

  def pack(self, inner_state: Any, averages: _engine.EngineState) -> PowerEmaState:
    trees = {k: s.tree for k, s in zip(self.keys, averages.slots, strict=True)}
    return PowerEmaState(inner_state, trees, averages.counted)

  def unpack(self, state: PowerEmaState) -> tuple[Any, _engine.EngineState]:
    count, stored = self.count(state), self.stored(state)
    slots = [_engine.SlotState(stored[k]) for k in self.keys]
    sizes = [_power_step_size(count, s) for s in self.sigma_rels]
    return self.inner(state), _engine.EngineState(slots, count, sizes)

  @classmethod
  def tracked(cls, state: PowerEmaState) -> list[float]:
    """The sigma_rel values a state tracks, in increasing order."""
    return sorted(float(k) for k in cls.stored(state))

  @classmethod
  def views(cls, state: PowerEmaState) -> list[View]:
    count, stored = cls.count(state), cls.stored(state)
    return [
      View(
        sigma_rel_key(s),
        s,
        _offload.tree_to_device(stored[sigma_rel_key(s)]),
        _power_step_size(count, s),
      )
      for s in cls.tracked(state)
    ]

  @classmethod
  def missing_which(cls, views: list[View]) -> str:
    return (
      f"This power_ema state tracks {len(views)} profiles (sigma_rel "
      f"{_tracked(views)}): pass `which=` one of them, or its index "
      f"0..{len(views) - 1}."
    )

  @classmethod
  def hint(cls, views: list[View]) -> str:
    return (
      f" This state tracks sigma_rel {_tracked(views)}; for another sigma_rel, "
      "save snapshots and use optax_ema.posthoc.reconstruct."
    )


class SWAState(NamedTuple):
  """State of :func:`swa`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    average: the running average of the snapshots, a tree with the structure
      of the parameters (float32 for float16/bfloat16 parameters, the
      parameters' dtype for other floats). Until the first snapshot it follows
      the parameters, so that :func:`optax_ema.averaged_params` returns the
      current parameters. Non-float leaves hold the latest parameter value;
      ``None`` leaves stay ``None``.
    count: int32 scalar, the number of updates applied so far (saturating).
    step_size: float32 scalar, the weight of the last snapshot in the mean,
      as a per-step weight over the period (1 before the first snapshot):
      what :func:`optax_ema.diagnostics` reports as the decay and window.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.swa(
    ...   optax.sgd(1.0), start_averaging=2, average_period=5
    ... )
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(type(state).__name__, int(state.count), state.average["w"])
    SWAState 0 [1. 1.]
  """

  inner_state: optax.OptState
  average: optax.Params
  # `count` shadows tuple.count, as in optax's states; the field name is the
  # layout of users' checkpoints.
  count: jax.Array  # type: ignore[assignment]
  step_size: jax.Array


# Declared here, named where users import it from (and where pickles and
# earlier versions look it up).
SWAState.__module__ = "optax_ema._swa"


@_register
class SWALayout(Layout):
  """:class:`SWAState`: one average and its step size."""

  state_type = SWAState
  added: ClassVar[dict[str, float]] = {"step_size": np.nan}

  def pack(self, inner_state: Any, averages: _engine.EngineState) -> SWAState:
    slots, count, step_sizes = averages
    return SWAState(inner_state, slots[0].tree, count, step_sizes[0])

  def unpack(self, state: SWAState) -> tuple[Any, _engine.EngineState]:
    slots = [_engine.SlotState(self.stored(state))]
    sizes = [state.step_size]
    return self.inner(state), _engine.EngineState(slots, self.count(state), sizes)

  @classmethod
  def views(cls, state: SWAState) -> list[View]:
    return [View(0, None, _offload.tree_to_device(cls.stored(state)), state.step_size)]

  @classmethod
  def missing_which(cls, views: list[View]) -> str:
    return ""
