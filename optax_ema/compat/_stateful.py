"""The stateful optimizer classes' core: state, steps, learning rate, averages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _reading
from optax_ema import _states
from optax_ema import _tree_utils
from optax_ema import _validation
from optax_ema import _warn
from optax_ema.compat import _optimizers


def _is_hyperparams_state(x: Any) -> bool:
  """An ``optax.inject_hyperparams`` state (of any optax version)."""
  return (
    isinstance(x, tuple)
    and "hyperparams" in getattr(x, "_fields", ())
    and isinstance(getattr(x, "hyperparams", None), dict)
  )


class Stateful:
  """The state and steps shared by :class:`MovingAverage` and :class:`SWA`."""

  def __init__(
    self,
    optimizer: Any,
    name: str,
    kwargs: dict[str, Any],
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation],
  ) -> None:
    _validation.check_str(name, "name", show_type=True)
    inner, self._optimizer_config = _optimizers.build_optimizer(
      optimizer, kwargs, type(self).__name__
    )
    self._by_name = isinstance(optimizer, str)
    self.name = name
    self.tx: optax.GradientTransformationExtraArgs = wrap(inner)
    self._state: Any = None
    self._params: Any = None
    self._pending: dict[str, Any] = {}
    self._extra_weights: dict[str, jax.Array] = {}
    self._slots: dict[tuple[tuple[Any, ...], str], jax.Array] = {}
    self._step_fn = jax.jit(self._step)

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, iterations={self.iterations})"

  # -- state -----------------------------------------------------------------

  def _step(self, state: Any, grads: Any, params: Any) -> tuple[Any, Any, Any]:
    updates, state = self.tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  def _stored(self) -> Any:
    """The averages as the state stores them."""
    return _states.layout_of(self._state).stored(self._state)

  def _require_built(self, what: str) -> None:
    if self._state is None:
      raise ValueError(
        f"`{what}` needs the optimizer state, which does not exist yet: call "
        "`build(params)` or apply a step first."
      )

  @property
  def opt_state(self) -> Any:
    """The functional optimizer state (``None`` before the first step)."""
    return self._state

  def build(self, var_list: Any) -> None:
    """Creates the optimizer state for the parameters ``var_list``.

    Called by the first step; call it yourself to read or set the weights
    before training. Building again for parameters of the same structure
    does nothing.
    """
    if self._state is not None:
      _tree_utils.check_like(
        self._stored(), var_list, "var_list", "the parameters it was built for"
      )
      return
    self._state = self.tx.init(var_list)
    self._params = var_list
    pending, self._pending = self._pending, {}
    for name, value in pending.items():
      self._set_hyperparam(name, value)

  def _apply(self, grads: Any, params: Any) -> tuple[Any, Any]:
    if self._state is None:
      self.build(params)
    new_params, updates, self._state = self._step_fn(self._state, grads, params)
    self._params = new_params
    return new_params, updates

  @property
  def iterations(self) -> int:
    """The number of steps applied so far."""
    if self._state is None:
      return 0
    return int(_states.layout_of(self._state).count(self._state))

  # -- learning rate ---------------------------------------------------------

  def _hyperparams_location(self, name: str) -> tuple[list[Any], Any, int]:
    leaves, treedef = jax.tree_util.tree_flatten(
      self._state, is_leaf=_is_hyperparams_state
    )
    for i, leaf in enumerate(leaves):
      if _is_hyperparams_state(leaf) and name in leaf.hyperparams:
        return leaves, treedef, i
    raise ValueError(
      f"The optimizer state holds no `{name}`: give the optimizer by name "
      "(e.g. 'sgd') or build it with "
      f"optax.inject_hyperparams(optax.sgd)({name}=...)."
    )

  def _set_hyperparam(self, name: str, value: Any) -> None:
    leaves, treedef, i = self._hyperparams_location(name)
    state = leaves[i]
    if name in getattr(state, "hyperparams_states", {}):
      raise ValueError(f"`{name}` is a schedule here, so it cannot be assigned.")
    old = state.hyperparams[name]
    hyperparams = dict(state.hyperparams)
    hyperparams[name] = jnp.asarray(value, dtype=jnp.asarray(old).dtype)
    leaves[i] = state._replace(hyperparams=hyperparams)
    self._state = jax.tree_util.tree_unflatten(treedef, leaves)

  @property
  def learning_rate(self) -> Any:
    """The (base) learning rate, read from and written to the state.

    Assigning a float changes the learning rate of the next step. With
    Keras's ``decay``, this is the rate before decay, as in Keras.
    """
    if self._state is not None:
      leaves, _, i = self._hyperparams_location("learning_rate")
      return leaves[i].hyperparams["learning_rate"]
    if "learning_rate" in self._pending:
      return jnp.asarray(self._pending["learning_rate"], jnp.float32)
    if self._by_name:
      value = self._optimizer_config["optimizer"]["config"]["learning_rate"]
      return value if callable(value) else jnp.asarray(value, jnp.float32)
    raise ValueError(
      "The learning rate of an optimizer given as a transformation is only "
      "known once the state exists: call `build(params)` or apply a step first."
    )

  @learning_rate.setter
  def learning_rate(self, value: Any) -> None:
    _validation.check_assigned_learning_rate(value)
    if self._state is not None:
      self._set_hyperparam("learning_rate", value)
      return
    if self._by_name and callable(
      self._optimizer_config["optimizer"]["config"]["learning_rate"]
    ):
      raise ValueError("`learning_rate` is a schedule here, so it cannot be assigned.")
    self._pending["learning_rate"] = value

  @property
  def lr(self) -> Any:
    """Keras's alias of :attr:`learning_rate`."""
    return self.learning_rate

  @lr.setter
  def lr(self, value: Any) -> None:
    self.learning_rate = value

  # -- steps -----------------------------------------------------------------

  def apply_gradients(self, grads_and_vars: Any) -> Any:
    """Applies one step and returns the new parameters.

    Args:
      grads_and_vars: a list (or iterator, e.g. ``zip(grads, params)``) of
        ``(gradient, param)`` pairs, or a ``(grads, params)`` tuple of pytrees.

    Returns:
      The new parameters: a list in the order of the pairs, or a pytree.
    """
    grads, params, as_pairs = _validation.split_grads_and_vars(grads_and_vars)
    new_params, _ = self._apply(grads, params)
    return list(new_params) if as_pairs else new_params

  @staticmethod
  def _params_of(var_list: Any) -> Any:
    return var_list() if callable(var_list) else var_list

  def _gradients(self, loss: Any, params: Any, grad_loss: Any = None) -> Any:
    _validation.check_loss(loss)
    out, vjp = jax.vjp(loss, params)
    if grad_loss is None:
      cotangent = jnp.ones_like(out)
    else:
      cotangent = jnp.asarray(grad_loss, jnp.asarray(out).dtype)
      if cotangent.shape != jnp.shape(out):
        raise ValueError(
          f"`grad_loss` has shape {cotangent.shape}, but the loss has shape "
          f"{jnp.shape(out)}."
        )
    (grads,) = vjp(cotangent)
    return grads

  def minimize(self, loss: Any, var_list: Any, grad_loss: Any = None) -> Any:
    """One step on the gradients of ``loss``; returns the new parameters.

    Args:
      loss: a callable ``loss(params)`` returning the loss (a non-scalar loss
        is summed, as ``tf.GradientTape`` does, unless ``grad_loss`` is given).
      var_list: the parameters, a pytree, or a zero-argument callable
        returning them (as Keras allows).
      grad_loss: optional cotangent of the loss, with the loss's shape.
    """
    params = self._params_of(var_list)
    grads = self._gradients(loss, params, grad_loss)
    return self._apply(grads, params)[0]

  def get_gradients(self, loss: Any, params: Any) -> Any:
    """The gradients of ``loss(params)``, a pytree like ``params``."""
    return self._gradients(loss, self._params_of(params))

  def get_updates(self, loss: Any, params: Any) -> Any:
    """One step on ``loss``, returning the updates instead of the new params.

    The state advances (iterations, averages and slots); add the updates
    with ``optax.apply_updates(params, updates)``.
    """
    params = self._params_of(params)
    return self._apply(self._gradients(loss, params), params)[1]

  # -- averages --------------------------------------------------------------

  def _params_index(self) -> list[tuple[tuple[Any, ...], Any]]:
    return [
      (p, x) for p, x in _tree_utils.leaves_with_paths(self._params) if x is not None
    ]

  def assign_average_vars(self, var_list: Any) -> Any:
    """``var_list`` with each parameter replaced by its average.

    A leaf is matched to its average by identity with the latest parameters,
    else by its pytree path. Leaves with no average come back unchanged, with
    a warning (as TFA warns). Averages come back in the leaves' dtypes.
    """
    self._require_built("assign_average_vars")
    averaged = _reading.averaged_params(self._state, self._params)
    by_path = dict(_tree_utils.leaves_with_paths(averaged))
    by_id = {id(x): (x, p) for p, x in self._params_index()}
    missing = []

    def pick(path: tuple[Any, ...], x: Any) -> Any:
      if x is None:
        return None
      found = by_id.get(id(x))
      where = found[1] if found is not None and found[0] is x else path
      average = by_path.get(where)
      if average is None or jnp.shape(average) != jnp.shape(x):
        missing.append(_tree_utils.keystr(path))
        return x
      return jnp.asarray(average).astype(jnp.asarray(x).dtype)

    out = jax.tree_util.tree_map_with_path(pick, var_list, is_leaf=_tree_utils.is_none)
    if missing:
      _warn.warn(
        f"{len(missing)} variable(s) have no average and are returned "
        f"unchanged: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}."
      )
    return out

  def swap_weights(self, params: Any) -> Any:
    """Exchanges the parameters and their averages, exactly.

    Returns the averages (in the parameters' dtypes) and keeps ``params`` as
    the new averages: calling it twice gives back ``params`` unchanged when
    the averages share the parameters' dtypes (TFA swapped with additions and
    subtractions, which rounds).
    """
    self._require_built("swap_weights")
    averaged = _reading.averaged_params(self._state, params)

    def keep(a: Any, p: Any) -> Any:
      if _tree_utils.is_none_or_masked(a):
        return a
      return jnp.asarray(p).astype(jnp.asarray(a).dtype)

    average = jax.tree.map(
      keep, self._stored(), params, is_leaf=_tree_utils.is_none_or_masked
    )
    layout = _states.layout_of(self._state)
    inner, count = layout.inner(self._state), layout.count(self._state)
    self._state = layout.replace(self._state, inner, average, count)
    self._params = averaged
    return averaged
