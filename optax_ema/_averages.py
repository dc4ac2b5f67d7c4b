"""How several averages and debiased averages are laid out, and ``which=``.

One average is a tree with the structure of the parameters. With
``debias=True`` it is a :class:`DebiasedAverage` (the tree and its
bias-correction weight), and a state that keeps several averages holds them
in an :class:`Averages`. :func:`resolve_which` is the one rule by which
``which=`` picks an average everywhere in the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _tree_utils


class DebiasedAverage(NamedTuple):
  """An average and its bias-correction weight (``debias=True``).

  The average of :func:`moving_average` with ``debias=True`` counts as zero
  until its first averaging step; ``weight`` is :math:`1 - \\prod_i d_i` over
  the decays applied so far, so the debiased value is ``average / weight``
  (what :func:`optax_ema.averaged_params` returns). Before the first
  averaging step ``weight`` is zero and ``average`` holds the initial
  parameters, which is then what it reads as.

  Attributes:
    average: the biased average, a tree with the structure of the parameters.
    weight: float32 scalar (for per-leaf decays a float32 vector, one entry
      per array leaf of ``average`` in ``jax.tree.leaves`` order), zero before
      the first update.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=True)
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(type(state.average).__name__, f"{state.average.weight:.1f}")
    DebiasedAverage 0.0
  """

  average: optax.Params
  weight: Any


@jax.tree_util.register_pytree_with_keys_class
class Averages:
  """Several averages of the same parameters, one per decay, in one state.

  What :attr:`MovingAverageState.average` holds when ``average_decay`` is a
  tuple/list (keys ``0, 1, ...``) or a dict (its keys) of decays. It is a
  pytree whose children are the averages (each a tree with the structure of
  the parameters, or a :class:`DebiasedAverage`); the keys and the constant
  decays are static data. Pick one with :func:`optax_ema.averaged_params`
  (``which=`` an index, a key or a decay value) or with ``averages[which]``.

  Attributes:
    averages: a tuple of averages.
    keys: their keys (ints for a tuple of decays, the dict keys otherwise).
    decays: the constant decay of each average, or ``None`` for a schedule.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> decays = {"fast": 0.9, "slow": 0.99}
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), decays)
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> print(state.average.keys, state.average.decays)
    ('fast', 'slow') (0.9, 0.99)
  """

  def __init__(
    self, averages: Any, keys: tuple[Any, ...], decays: tuple[float | None, ...]
  ) -> None:
    # No validation: JAX rebuilds pytrees with placeholder children.
    self.averages = tuple(averages)
    self.keys = tuple(keys)
    self.decays = tuple(decays)

  def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], Any]:
    def key_of(k: Any) -> Any:
      if isinstance(k, str):
        return jax.tree_util.DictKey(k)
      return jax.tree_util.SequenceKey(k)

    children = [(key_of(k), a) for k, a in zip(self.keys, self.averages, strict=True)]
    return children, (self.keys, self.decays)

  @classmethod
  def tree_unflatten(cls, aux: Any, children: Any) -> Averages:
    return cls(children, *aux)

  def choices(self) -> str:
    """The valid ``which=`` values, in words."""
    return describe_choices(self.keys, self.decays, "decay")

  def index(self, which: Any) -> int:
    """The position of ``which`` (an index, a key or a decay value)."""
    return resolve_which(which, self.keys, self.decays, "decay")

  def __getitem__(self, which: Any) -> Any:
    return self.averages[self.index(which)]

  def __len__(self) -> int:
    return len(self.averages)

  def __repr__(self) -> str:
    return (
      f"Averages(keys={self.keys!r}, decays={self.decays!r}, "
      f"averages={self.averages!r})"
    )


def describe_choices(keys: Sequence[Any], values: Sequence[Any], noun: str) -> str:
  parts = []
  for i, (k, v) in enumerate(zip(keys, values, strict=True)):
    label = f"{noun} {v!r}" if v is not None else "a schedule"
    parts.append(f"{i}" if k == i else f"{i} or {k!r}")
    parts[-1] += f" ({label})"
  return ", ".join(parts)


def resolve_which(
  which: Any,
  keys: Sequence[Any],
  values: Sequence[Any],
  noun: str,
  name: str = "which",
) -> int:
  """The position that ``which`` names among several averages.

  ``which`` is a position (negative counts from the end), a key, or the
  value the average is known by (its constant decay, its ``sigma_rel``),
  compared as float32 numbers, which is how the package applies them; a
  0-d array counts as the number it holds. Raises a ValueError listing the
  choices when it names none or several. ``name`` is the argument's name in
  messages.
  """
  n = len(keys)
  choices = describe_choices(keys, values, noun)
  if isinstance(which, (jax.Array, np.ndarray, np.generic)) and np.ndim(which) == 0:
    if not isinstance(which, jax.core.Tracer):
      which = np.asarray(which).item()
  if isinstance(which, (bool, np.bool_)):
    raise TypeError(
      f"`{name}` must be a position, a key or a {noun}, got {which!r}; "
      f"choose one of: {choices}."
    )
  if isinstance(which, str):
    if which in keys:
      return list(keys).index(which)
  elif isinstance(which, (int, np.integer)):
    if -n <= int(which) < n:
      return int(which) % n
  elif _tree_utils.is_python_number(which) or isinstance(which, np.floating):
    target = np.float32(which)
    matches = [
      i for i, v in enumerate(values) if v is not None and np.float32(v) == target
    ]
    if len(matches) == 1:
      return matches[0]
    if len(matches) > 1:
      raise ValueError(
        f"`{name}`={which!r} matches {len(matches)} averages with that {noun}; "
        f"pick one by position or key: {choices}."
      )
  raise ValueError(
    f"`{name}`={which!r} picks none of the {n} averages in this state; "
    f"choose one of: {choices}."
  )


def debiased_value(average: Any, weight: Any) -> Any:
  """``average / weight`` on float leaves; the average itself where weight is 0."""

  def leaf(a: Any, w: Any) -> Any:
    if _tree_utils.is_none_or_masked(a) or not _tree_utils.is_float(a):
      return a
    w = jnp.asarray(w, jnp.float32)
    compute = jnp.promote_types(a.dtype, jnp.float32)
    safe = jnp.where(w > 0, w, jnp.ones_like(w)).astype(compute)
    return (a.astype(compute) / safe).astype(a.dtype)

  if jnp.ndim(weight) == 0:
    return jax.tree.map(
      lambda a: leaf(a, weight), average, is_leaf=_tree_utils.is_none_or_masked
    )
  # Per-leaf decays: one weight per array leaf, in `jax.tree.leaves` order.
  leaves, treedef = _tree_utils.flatten(average, is_leaf=None)
  return treedef.unflatten([leaf(a, weight[i]) for i, a in enumerate(leaves)])


def decay_label(decay: Any) -> float | None:
  """What :attr:`Averages.decays` records of one decay: a constant, or None."""
  if _tree_utils.is_concrete_scalar(decay):
    return float(decay)
  return None
