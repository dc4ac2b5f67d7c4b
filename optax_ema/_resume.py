"""Resuming from a checkpoint written before EMA was enabled."""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_ema import _reading
from optax_ema import _states
from optax_ema import _tree_utils


def _inner(state: Any) -> Any:
  return _states.layout_of(state).inner(state)


def _with_inner(state: Any, inner: Any) -> Any:
  layout = _states.layout_of(state)
  return layout.replace(state, inner, layout.stored(state), layout.count(state))


def _same_structure(a: Any, b: Any) -> bool:
  return bool(_tree_utils.structure(a) == _tree_utils.structure(b))


def _check_leaves(expected: Any, restored: Any) -> None:
  for (path, want), got in zip(
    jax.tree_util.tree_flatten_with_path(expected)[0],
    jax.tree.leaves(restored),
    strict=True,
  ):
    want_shape = tuple(getattr(want, "shape", ()))
    got_shape = tuple(getattr(got, "shape", ()))
    if want_shape != got_shape:
      raise ValueError(
        f"`inner_state` does not fit the optimizer: {_tree_utils.keystr(path)} "
        f"has shape {got_shape}, expected {want_shape}."
      )


def resume_with_average(
  tx: optax.GradientTransformation,
  inner_state: optax.OptState,
  params: optax.Params,
) -> optax.OptState:
  """Builds a full EMA state from a checkpoint written before EMA was enabled.

  A run trained with a plain optimizer (say ``optax.adam(lr)``) and
  checkpointed can continue with ``tx = moving_average(optax.adam(lr))``:
  restore the old optimizer state and the params as before, then call this
  to get ``tx``'s state. It is ``tx.init(params)`` with the wrapped
  optimizer's state replaced by the restored one, so that

  - the wrapped optimizer continues exactly where it stopped (its moments,
    its step count, its schedules), so training is the same as without EMA;
  - the average starts from the restored params, and the EMA count starts at
    0 (``start_step``, ``dynamic_decay`` and decay schedules count from the
    resume, like a fresh EMA).

  ``tx`` may also hold the moving average deeper, as in
  ``optax.chain(optax.clip(1.0), moving_average(optax.adam(lr)))``.
  ``inner_state`` is then either the state of the optimizer that
  :func:`moving_average` wraps (``adam``'s), or the whole old optimizer state,
  the state of ``tx`` without the wrapper (here the state of
  ``optax.chain(optax.clip(1.0), optax.adam(lr))``); in the second case the
  other parts are taken from it too.

  Args:
    tx: a :func:`optax_ema.moving_average` transformation, or any
      transformation holding exactly one in its state.
    inner_state: the restored state of the optimizer before EMA was enabled.
    params: the restored parameters.

  Returns:
    A state for ``tx``, with the structure of ``tx.init(params)``.

  Raises:
    ValueError: ``tx`` holds no moving average or several, or
      ``inner_state`` has neither of the accepted structures or shapes.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> old_tx = optax.adam(0.1)  # the run was checkpointed with this
    >>> old_state = old_tx.init(params)
    >>> _, old_state = old_tx.update({"w": jnp.ones(2)}, old_state, params)
    >>> tx = optax_ema.moving_average(optax.adam(0.1), average_decay=0.9)
    >>> state = optax_ema.resume_with_average(tx, old_state, params)
    >>> print(int(state.inner_state[0].count), int(state.count))
    1 0
    >>> print([f"{x:.1f}" for x in optax_ema.averaged_params(state)["w"]])
    ['1.0', '2.0']

  .. note::
    If the old checkpoint was restored without a target (plain dicts and
    lists instead of optax's named tuples), restore it again with the
    old optimizer's abstract state as target, e.g.
    ``jax.eval_shape(old_tx.init, params)``.
  """
  fresh = tx.init(params)
  found = [
    leaf
    for leaf in jax.tree.leaves(fresh, is_leaf=_reading.is_average_state)
    if _reading.is_average_state(leaf)
  ]
  if len(found) != 1:
    raise ValueError(
      "`tx` must hold exactly one optax_ema.moving_average (or power_ema, "
      f"swa) state, found "
      f"{len(found)} in its state (a {type(fresh).__name__})."
    )
  if _reading.find_average_states(inner_state):
    raise ValueError(
      "`inner_state` already holds an averaging state: it is a state of "
      "`tx` itself (or of another averaging wrapper), not of the optimizer "
      "before the average was enabled; use it as it is."
    )

  # The old optimizer's state: tx's state without the moving-average wrapper.
  stripped = jax.tree.map(
    lambda x: _inner(x) if _reading.is_average_state(x) else x,
    fresh,
    is_leaf=_reading.is_average_state,
  )
  if _same_structure(stripped, inner_state):
    _check_leaves(stripped, inner_state)
    # MovingAverageState nodes are leaves here: the restored tree matches up
    # to them, and holds the wrapped optimizer's state at their place.
    return jax.tree.map(
      lambda x, r: _with_inner(x, r) if _reading.is_average_state(x) else r,
      fresh,
      inner_state,
      is_leaf=_reading.is_average_state,
    )
  expected_inner = _inner(found[0])
  if _same_structure(expected_inner, inner_state):
    _check_leaves(expected_inner, inner_state)
    return jax.tree.map(
      lambda x: _with_inner(x, inner_state) if _reading.is_average_state(x) else x,
      fresh,
      is_leaf=_reading.is_average_state,
    )
  raise ValueError(
    "`inner_state` has the structure neither of the wrapped optimizer's state "
    f"({jax.tree.structure(expected_inner)}) nor of `tx`'s state without the "
    f"moving average ({jax.tree.structure(stripped)}); got "
    f"{jax.tree.structure(inner_state)}. Restore the old checkpoint with the "
    "old optimizer's state as target."
  )
