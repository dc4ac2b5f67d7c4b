"""Flax NNX ``Variable`` leaves in the trees the readers take.

NNX hands out its states with every array wrapped in a ``Variable`` (a
``Param`` in ``nnx.state(model, nnx.Param)``, an ``OptVariable`` in
``optimizer.opt_state``), pytree nodes whose metadata (sharding, the
variable's type) differ from tree to tree. The readers compare and combine
the arrays inside them: :func:`strip` takes the wrappers off, and
:func:`rewrap` puts a tree of results back into the wrappers of the tree the
caller passed. Flax is never imported here: when ``flax.nnx`` has not been
imported, no tree can hold a ``Variable``.
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from optax_ema import _tree_utils


def _types() -> tuple[type, ...]:
  lib = sys.modules.get("flax.nnx.variablelib")
  if lib is None:
    return ()
  found = (vars(lib).get("Variable"), vars(lib).get("VariableState"))
  return tuple(t for t in found if isinstance(t, type))


def value(variable: Any) -> Any:
  """A ``Variable``'s value (``get_value()``, or ``.value`` before flax 0.11)."""
  get = getattr(variable, "get_value", None)
  return get() if callable(get) else variable.value


def has_variables(tree: Any) -> bool:
  """Whether ``tree`` holds an NNX ``Variable`` (or a flax<0.11 ``VariableState``)."""
  types = _types()
  if not types:
    return False
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, types))
  return any(isinstance(x, types) for x in leaves)


def strip(tree: Any) -> Any:
  """``tree`` with every NNX ``Variable`` replaced by its value."""
  types = _types()
  if not types:
    return tree
  return jax.tree.map(
    lambda x: value(x) if isinstance(x, types) else x,
    tree,
    is_leaf=lambda x: isinstance(x, types),
  )


def rewrap(original: Any, values: Any) -> Any:
  """``values`` (shaped like ``strip(original)``) in ``original``'s Variables.

  Each ``Variable`` of ``original`` is rebuilt around the value at its place
  in ``values``, with its type and metadata (sharding names among them).
  """
  if not has_variables(original):
    return values
  return _tree_utils.structure(original).unflatten(jax.tree.leaves(values))
