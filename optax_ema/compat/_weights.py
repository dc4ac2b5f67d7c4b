"""Keras's weights of the stateful classes: the state's arrays as a flat list."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _states
from optax_ema import _tree_utils
from optax_ema import _validation
from optax_ema.compat import _stateful


def initial_value(initializer: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  _validation.check_initializer(initializer)
  if isinstance(initializer, str):
    make = jnp.zeros if initializer == "zeros" else jnp.ones
    return make(shape, dtype)
  if callable(initializer):
    value = jnp.asarray(initializer(shape, dtype), dtype)
  elif isinstance(initializer, (int, float)) and not isinstance(initializer, bool):
    value = jnp.full(shape, initializer, dtype)
  else:
    value = jnp.asarray(initializer, dtype)
  if value.shape != tuple(shape):
    raise ValueError(
      f"`initializer` gave an array of shape {value.shape}, expected {tuple(shape)}."
    )
  return value


def _parts(state: Any) -> tuple[Any, Any, Any]:
  """Keras's order of a state's arrays: the count, the averages, the inner state."""
  layout = _states.layout_of(state)
  return layout.count(state), layout.stored(state), layout.inner(state)


class Weights(_stateful.Stateful):
  """``weights``, ``get_weights``/``set_weights`` and ``add_weight``."""

  # -- weights ---------------------------------------------------------------

  @property
  def weights(self) -> list[jax.Array]:
    """The state's arrays, in a stable order.

    ``[iterations, *averages, *inner optimizer state, *add_weight arrays,
    *add_slot arrays]``: the step count, then the averages in the order of
    ``jax.tree.leaves(params)``, then the leaves of the wrapped optimizer's
    state (``jax.tree.leaves`` order), then the arrays made by
    :meth:`add_weight` and :meth:`add_slot`, in creation order. Empty
    before the state exists.
    """
    if self._state is None:
      return []
    state = self._state
    return [
      *jax.tree.leaves(_parts(state)),
      *self._extra_weights.values(),
      *self._slots.values(),
    ]

  def variables(self) -> list[jax.Array]:
    """The same list as :attr:`weights`."""
    return self.weights

  def get_weights(self) -> list[np.ndarray]:
    """:attr:`weights` as NumPy arrays."""
    return [np.asarray(w) for w in self.weights]

  def set_weights(self, weights: Any) -> None:
    """Replaces the state's arrays with ``weights`` (the order of :attr:`weights`).

    Raises:
      ValueError: before the state exists, or for a list of another length, or
        an array of another shape or dtype (Python scalars and lists are
        converted).
    """
    self._require_built("set_weights")
    weights = list(weights)
    current = self.weights
    if len(weights) != len(current):
      raise ValueError(
        f"`weights` must hold {len(current)} arrays (iterations, averages, "
        f"optimizer state, extra weights), got {len(weights)}."
      )
    new = []
    for i, (w, ref) in enumerate(zip(weights, current, strict=True)):
      if hasattr(w, "dtype") and jnp.dtype(w.dtype) != ref.dtype:
        raise ValueError(
          f"`weights[{i}]` has dtype {jnp.dtype(w.dtype).name}, expected "
          f"{ref.dtype.name}."
        )
      value = jnp.asarray(w, dtype=ref.dtype)
      if value.shape != ref.shape:
        raise ValueError(
          f"`weights[{i}]` has shape {value.shape}, expected {ref.shape}."
        )
      new.append(value)
    state = self._state
    treedef = _tree_utils.structure(_parts(state))
    count, average, inner_state = jax.tree.unflatten(treedef, new[: treedef.num_leaves])
    layout = _states.layout_of(state)
    self._state = layout.replace(state, inner_state, average, count)
    rest = iter(new[treedef.num_leaves :])
    self._extra_weights = {k: next(rest) for k in self._extra_weights}
    self._slots = {k: next(rest) for k in self._slots}

  def add_weight(
    self,
    name: str,
    shape: Any,
    dtype: Any = None,
    initializer: Any = "zeros",
    trainable: bool | None = None,
  ) -> jax.Array:
    """Creates a named array kept with the state and listed in :attr:`weights`.

    ``dtype`` defaults to float32; ``initializer`` is as in :meth:`add_slot`.
    Optimizer weights are not trainable: ``trainable=True`` is an error.
    """
    _validation.check_str(name, "name")
    if name in self._extra_weights:
      raise ValueError(f"`name` {name!r} is already a weight of this optimizer.")
    _validation.check_not_trainable(trainable)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    value = initial_value(initializer, shape, jnp.dtype(dtype or jnp.float32))
    self._extra_weights[name] = value
    return value
