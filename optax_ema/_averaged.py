"""Reading the averaged parameters out of any optimizer state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _core
from optax_ema import _tree_utils


def _read_moving_average(state: _core.MovingAverageState, which: Any) -> Any:
  average = state.average
  if isinstance(average, _core.Averages):
    if which is None:
      raise ValueError(
        f"This state keeps {len(average)} averages (one per decay); pass "
        f"`which=` one of: {average.choices()}."
      )
    average = average[which]
  elif which is not None:
    raise ValueError(
      f"`which` must be None for a state with a single average, got {which!r}."
    )
  if isinstance(average, _core.DebiasedAverage):
    return _core.debiased_value(average.average, average.weight)
  return average


# State type -> reader(state, which) returning its averaged tree (same
# structure as the params, MaskedNode at masked-out leaves). `which` selects
# one of several averages (None when the caller did not choose); a reader
# raises ValueError, listing the choices, when `which` does not fit. Other
# averaging transforms of this package register here so that
# `averaged_params` finds them too.
_READERS: dict[type, Callable[[Any, Any], Any]] = {
  _core.MovingAverageState: _read_moving_average,
}


def register_average_state(state_type: type, reader: Callable[[Any, Any], Any]) -> None:
  """Lets :func:`averaged_params` find states of ``state_type``."""
  _READERS[state_type] = reader


def _is_average_state(x: Any) -> bool:
  return isinstance(x, tuple(_READERS))


def find_average_states(opt_state: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """Every averaging state inside ``opt_state``, with its pytree path."""
  if _is_average_state(opt_state):
    return [((), opt_state)]
  flat, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_average_state)
  return [(path, x) for path, x in flat if _is_average_state(x)]


def find_average_state(opt_state: Any, caller: str = "averaged_params") -> Any:
  """The single averaging state inside ``opt_state``; ValueError otherwise."""
  found = find_average_states(opt_state)
  if not found:
    names = ", ".join(sorted(t.__name__ for t in _READERS))
    raise ValueError(
      f"`{caller}` found no averaging state ({names}) in `opt_state` "
      f"(a {type(opt_state).__name__}); was the optimizer wrapped with "
      "optax_ema.moving_average?"
    )
  if len(found) > 1:
    where = ", ".join(
      f"{type(s).__name__} at opt_state{_tree_utils.keystr(p)}" for p, s in found
    )
    raise ValueError(
      f"`{caller}` found {len(found)} averaging states in `opt_state`: "
      f"{where}; pass the one you want, e.g. `{caller}(opt_state[0], ...)`."
    )
  return found[0][1]


def averaged_params(
  opt_state: optax.OptState,
  params: optax.Params | None = None,
  *,
  which: Any = None,
) -> optax.Params:
  """Returns the averaged parameters held in an optimizer state.

  Finds the single :class:`MovingAverageState` (or other averaging state of
  this package) anywhere inside ``opt_state``: at its root, inside
  ``optax.chain`` / ``optax.named_chain`` / ``optax.inject_hyperparams`` /
  ``optax.MultiSteps`` / ``optax.masked`` states, or inside any pytree that
  holds one (e.g. a Flax ``TrainState``).

  Args:
    opt_state: an optimizer state, or any pytree holding one.
    params: optional current parameters. When given, float leaves come back
      in the params' dtypes, leaves that are not averaged (masked out, or not
      floating point) come from ``params``, and the structure is checked.
    which: for a state that keeps several averages (``average_decay`` a
      tuple or dict), which one to return: an index, a key, or a decay
      value. Required there (the error lists the choices); must be ``None``
      for a state with one average.

  Returns:
    A pytree with the structure of the parameters. A debiased average
    (``debias=True``) comes back bias-corrected, ``average / weight`` (zero
    before the first update).

  Raises:
    ValueError: no averaging state, or more than one, inside ``opt_state``; a
      masked state read without ``params``; ``params`` of another structure.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.ones(2, jnp.bfloat16)}
    >>> tx = optax.chain(optax.clip(1.0), optax_ema.moving_average(optax.sgd(0.1)))
    >>> state = tx.init(params)
    >>> avg = optax_ema.averaged_params(state, params)
    >>> print(avg["w"].dtype, avg["w"])
    bfloat16 [1 1]
  """
  state = find_average_state(opt_state)
  average = _READERS[type(state)](state, which)
  if params is None:
    masked = [
      _tree_utils.keystr(path)
      for path, leaf in jax.tree_util.tree_flatten_with_path(
        average, is_leaf=_tree_utils.is_none_or_masked
      )[0]
      if isinstance(leaf, optax.MaskedNode)
    ]
    if masked:
      raise ValueError(
        "`averaged_params` needs `params` for a state whose average is masked "
        f"(no average is kept at {', '.join(masked[:3])}"
        f"{', ...' if len(masked) > 3 else ''}): call "
        "`averaged_params(opt_state, params)`."
      )
    return average
  _tree_utils.check_like(average, params, "params", "the averaged parameters")

  def leaf(p: Any, a: Any) -> Any:
    if p is None or isinstance(a, optax.MaskedNode):
      return p
    if not (_tree_utils.is_float(a) and _tree_utils.is_float(p)):
      return p
    return jnp.asarray(a).astype(jnp.asarray(p).dtype)

  return jax.tree.map(leaf, params, average, is_leaf=_tree_utils.is_none)
