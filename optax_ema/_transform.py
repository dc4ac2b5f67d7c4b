"""The optax transformation around the engine, shared by every averaging wrapper.

:func:`averaging_transformation` turns an :class:`~optax_ema._engine.Engine`
and a :class:`~optax_ema._states.Layout` (how the averages sit in the
transform's own state type) into an
``optax.GradientTransformationExtraArgs`` that wraps an inner optimizer:
``init`` builds the inner state and the averages, ``update`` runs
the inner optimizer, returns its updates (or the overwrite's) and lets the
engine average.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_ema import _engine
from optax_ema import _states
from optax_ema import _tree_utils


def _check_state(state: Any, layout: _states.Layout, caller: str) -> None:
  if isinstance(state, layout.state_type):
    return
  name = layout.state_type.__name__
  hint = (
    "For a checkpoint written before the average was enabled, build the "
    "state with `optax_ema.resume_with_average(tx, old_state, params)`."
  )
  if isinstance(state, (dict, list)):
    hint = (
      "It holds plain containers, as Orbax restores a checkpoint without a "
      "target: restore with `target=jax.eval_shape(tx.init, params)`, or, for "
      "a checkpoint written by optax_ema 0.1.0, convert it with "
      "`optax_ema.upgrade_state(restored, jax.eval_shape(tx.init, params))`."
    )
  raise TypeError(
    f"`state` must be the {name} made by this transformation's `init`, got "
    f"a {type(state).__name__}: {caller}'s update was given a state that "
    f"this transformation did not make. {hint}"
  )


def averaging_transformation(
  optimizer: optax.GradientTransformation,
  engine: _engine.Engine,
  layout: _states.Layout,
  caller: str,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` so that ``engine`` averages its params.

  ``optimizer`` comes checked by the factory
  (:func:`optax_ema._validation.checked_optimizer`).
  """
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> Any:
    inner_state = inner.init(params)
    return layout.pack(inner_state, engine.init(params))

  def update_fn(
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, Any]:
    _check_state(state, layout, caller)
    inner_state, averages = layout.unpack(state)
    _tree_utils.check_update_args(caller, averages.slots[0].tree, params, updates)
    new_updates, new_inner = inner.update(updates, inner_state, params, **extra_args)
    averages, out_updates = engine.update(
      averages,
      params=params,
      grads=updates,
      updates=new_updates,
      inner_before=inner_state,
      inner_after=new_inner,
    )
    return out_updates, layout.pack(new_inner, averages)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
