"""Keras's slots of the stateful classes: per-parameter arrays by name."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _states
from optax_ema import _tree_utils
from optax_ema import _validation
from optax_ema.compat import _stateful
from optax_ema.compat import _weights

# Keras slot names -> optax state field names.
_KERAS_SLOT_NAMES = {
  "m": "mu",
  "v": "nu",
  "momentum": "trace",
  "rms": "nu",
  "accumulator": "sum_of_squares",
}


def _simple_key(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


class Slots(_stateful.Stateful):
  """``get_slot``, ``get_slot_names`` and ``add_slot``."""

  # -- slots -----------------------------------------------------------------

  def _path_of(self, var: Any, caller: str) -> tuple[Any, ...]:
    if self._params is None:
      raise ValueError(
        f"`{caller}` needs the parameters, which are not known yet: call "
        "`build(params)` or apply a step first."
      )
    index = self._params_index()
    if isinstance(var, (int, np.integer)) and not isinstance(var, bool):
      var = (int(var),)
    if isinstance(var, str):
      for path, _ in index:
        simple = [str(_simple_key(e)) for e in path]
        if var in (jax.tree_util.keystr(path), "/".join(simple), ".".join(simple)):
          return path
    elif isinstance(var, tuple):
      for path, _ in index:
        if var == path or var == tuple(_simple_key(e) for e in path):
          return path
    else:
      for path, leaf in index:
        if leaf is var:
          return path
    known = ", ".join(_tree_utils.keystr(p) for p, _ in index[:6])
    raise KeyError(
      f"`{caller}`: `var` ({type(var).__name__}) is not one of the parameters "
      f"of the latest step ({known}{', ...' if len(index) > 6 else ''}); pass "
      "its path, e.g. ('layer', 'w') or \"['layer']['w']\", or the array "
      "itself from the latest parameters."
    )

  def _inner_slots(self) -> dict[str, Any]:
    """Param-shaped fields of the wrapped optimizer's state, by field name."""
    if self._state is None:
      return {}
    reference = [
      (p, jnp.shape(x))
      for p, x in _tree_utils.leaves_with_paths(self._stored())
      if x is not None
    ]
    found: dict[str, Any] = {}

    def shaped_like_params(tree: Any) -> bool:
      leaves = [
        (p, jnp.shape(x))
        for p, x in _tree_utils.leaves_with_paths(tree)
        if x is not None
      ]
      return leaves == reference and _tree_utils.structure(
        tree, is_leaf=_tree_utils.is_none_or_masked
      ) == _tree_utils.structure(self._stored(), is_leaf=_tree_utils.is_none_or_masked)

    def walk(tree: Any) -> None:
      if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for field in tree._fields:
          value = getattr(tree, field)
          if field not in found and shaped_like_params(value):
            found[field] = value
          else:
            walk(value)
      elif isinstance(tree, (tuple, list)):
        for value in tree:
          walk(value)
      elif isinstance(tree, dict):
        for value in tree.values():
          walk(value)

    walk(_states.layout_of(self._state).inner(self._state))
    return found

  def get_slot_names(self) -> list[str]:
    """``"average"``, the wrapped optimizer's slots (e.g. ``"mu"``, ``"nu"``),
    then the slots made by :meth:`add_slot`."""
    names = ["average", *self._inner_slots()]
    for _, name in self._slots:
      if name not in names:
        names.append(name)
    return names

  def get_slot(self, var: Any, slot_name: str) -> jax.Array:
    """The slot ``slot_name`` of one parameter.

    Args:
      var: the parameter, by its pytree path (a tuple of keys such as
        ``("dense", "kernel")``, a key path, a string such as
        ``"['dense']['kernel']"`` or ``"dense/kernel"``, or an int index for a
        list of parameters), or the array itself from the latest parameters.
      slot_name: ``"average"``, a slot of the wrapped optimizer (an optax
        state field such as ``"mu"``, ``"nu"``, ``"trace"``; Keras's ``"m"``,
        ``"v"``, ``"momentum"`` are understood) or one made by
        :meth:`add_slot`.

    Raises:
      KeyError: an unknown parameter or slot name.
    """
    self._require_built("get_slot")
    path = self._path_of(var, "get_slot")
    if (path, slot_name) in self._slots:
      return self._slots[(path, slot_name)]
    if slot_name == "average":
      tree = self._stored()
    else:
      inner = self._inner_slots()
      field = slot_name if slot_name in inner else _KERAS_SLOT_NAMES.get(slot_name)
      if field not in inner:
        raise KeyError(
          f"`slot_name` {slot_name!r} is not a slot of this optimizer; its "
          f"slots are {self.get_slot_names()}."
        )
      tree = inner[field]
    leaf = dict(_tree_utils.leaves_with_paths(tree)).get(path)
    if leaf is None or isinstance(leaf, optax.MaskedNode):
      raise KeyError(
        f"The parameter at {_tree_utils.keystr(path)} has no {slot_name!r} slot."
      )
    return leaf

  def add_slot(self, var: Any, slot_name: str, initializer: Any = "zeros") -> jax.Array:
    """Creates (or returns the existing) slot ``slot_name`` for ``var``.

    The new array has the parameter's shape and dtype, is kept with the state,
    is returned by :meth:`get_slot` and :attr:`weights`, and is restored by
    :meth:`set_weights`. ``initializer`` is ``"zeros"``, ``"ones"``, a number,
    an array, or a callable ``(shape, dtype) -> array``.
    """
    self._require_built("add_slot")
    _validation.check_str(slot_name, "slot_name")
    path = self._path_of(var, "add_slot")
    if (path, slot_name) in self._slots:
      return self._slots[(path, slot_name)]
    if slot_name == "average" or slot_name in self._inner_slots():
      return self.get_slot(path, slot_name)
    leaf = dict(_tree_utils.leaves_with_paths(self._params))[path]
    value = _weights.initial_value(
      initializer, jnp.shape(leaf), jnp.asarray(leaf).dtype
    )
    self._slots[(path, slot_name)] = value
    return value
