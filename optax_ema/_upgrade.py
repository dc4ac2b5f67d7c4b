"""Checkpoints of earlier versions: converting a restored state to today's layout."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _reading
from optax_ema import _states
from optax_ema import _tree_utils
from optax_ema.posthoc import _orbax

# Fields this version added to the states, with what an older state means
# for them (their layouts say).
_ADDED_FIELDS = {
  name: value
  for layout in _states.LAYOUTS.values()
  for name, value in layout.added.items()
}

_MISSING = object()


def _child(node: Any, entry: Any) -> Any:
  """The child of a restored node at one key-path entry, or ``_MISSING``."""
  if isinstance(entry, jax.tree_util.GetAttrKey):
    if isinstance(node, dict):
      return node.get(entry.name, _MISSING)
    return getattr(node, entry.name, _MISSING)
  key = getattr(entry, "key", getattr(entry, "idx", _MISSING))
  if isinstance(node, dict):
    for candidate in (key, str(key)):
      if candidate in node:
        return node[candidate]
    return _MISSING
  if isinstance(node, (list, tuple)) and isinstance(key, int) and key < len(node):
    return node[key]
  return _MISSING


def _lookup(restored: Any, path: tuple[Any, ...]) -> Any:
  node = restored
  for entry in path:
    node = _child(node, entry)
    if node is _MISSING:
      return _MISSING
  return node


def _convert(value: Any, like: Any, path: tuple[Any, ...]) -> Any:
  """``value`` as a leaf of ``like``'s shape, dtype (and sharding)."""
  where = _tree_utils.keystr(path)
  if _tree_utils.is_key(like):
    if _tree_utils.is_key(value):
      return value
    return jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(like))
  value = jnp.asarray(value)
  if value.shape != tuple(like.shape) or value.dtype != like.dtype:
    raise ValueError(
      f"`restored` does not fit `like` at {where}: it holds {value.dtype}"
      f"{list(value.shape)}, the state {jnp.dtype(like.dtype)}{list(like.shape)}."
    )
  sharding = getattr(like, "sharding", None)
  if sharding is not None:
    value = jax.device_put(value, sharding)
  return value


def _check_order(restored: Any, like: Any) -> None:
  """``upgrade_state(like, restored)``: the arguments in the wrong order."""
  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(restored))
  today = bool(_reading.find_average_states(restored))
  if abstract or (today and not _reading.find_average_states(like)):
    raise ValueError(
      "`restored` and `like` look swapped: `restored` "
      + ("holds abstract leaves (jax.ShapeDtypeStruct)" if abstract else "")
      + (" and " if abstract and today else "")
      + ("already has this version's layout" if today else "")
      + ", as `like` should. Call `optax_ema.upgrade_state(restored, like)`: "
      "the tree restored from the checkpoint first, then "
      "`jax.eval_shape(tx.init, params)`."
    )


def upgrade_state(restored: Any, like: optax.OptState) -> optax.OptState:
  """Converts an optimizer state saved by optax_ema 0.1.0 to this version's layout.

  This version's :class:`~optax_ema.MovingAverageState` and
  :class:`~optax_ema.SWAState` record the step size of their last averaging
  step (``step_size``, for :func:`optax_ema.diagnostics`), which 0.1.0
  states did not hold. Restore the old checkpoint without a target (Orbax
  then gives plain dicts and lists) and pass it here with the state of the
  same transformation today, ``jax.eval_shape(tx.init, params)``: every leaf
  is taken from ``restored`` by its path, and the added ``step_size`` reads
  NaN ("not recorded") until the next averaging step. Training continues
  as it would have, to float32 rounding: bit for bit for a constant decay;
  where this version forms ``1 - decay`` more precisely (the schedules of
  :mod:`optax_ema.schedules`, SWA's running mean) one float32 rounding
  apart, and a bfloat16 ``power_ema`` average, which 0.1.0 stored
  unrounded under ``jit``, one bfloat16 place apart.
  :func:`restore_checkpoint` restores and converts in one call.

  Args:
    restored: the restored optimizer state (or any tree holding one, e.g.
      ``{"params": ..., "opt_state": ...}``, with ``like`` of the same form),
      as plain containers or as the old named tuples.
    like: a tree with today's structure, e.g.
      ``jax.eval_shape(tx.init, params)``: abstract leaves (with shardings,
      to place the result) or concrete ones.

  Returns:
    A tree with the structure of ``like`` holding the restored values.

  Raises:
    ValueError: ``restored`` lacks a leaf of ``like`` that this version did
      not add, holds leaves ``like`` has no place for, or a leaf of another
      shape or dtype (it was written by another transformation).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.ones(2)}
    >>> tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=0.9)
    >>> # What Orbax restores, without a target, from a 0.1.0 checkpoint:
    >>> restored = {
    ...   "inner_state": [None, None],
    ...   "average": {"w": jnp.full(2, 0.5)},
    ...   "count": jnp.asarray(3, jnp.int32),
    ... }
    >>> like = jax.eval_shape(tx.init, params)
    >>> state = optax_ema.upgrade_state(restored, like)
    >>> print(type(state).__name__, int(state.count), state.average["w"])
    MovingAverageState 3 [0.5 0.5]
  """
  _check_order(restored, like)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    like, is_leaf=_tree_utils.is_none_or_masked
  )
  leaves, used = [], 0
  for path, leaf in flat:
    if _tree_utils.is_none_or_masked(leaf):
      leaves.append(leaf)
      continue
    value = _lookup(restored, path)
    if value is _MISSING:
      added = [getattr(e, "name", None) for e in path]
      name = next((n for n in added if n in _ADDED_FIELDS), None)
      if name is None:
        raise ValueError(
          f"`restored` has no leaf at {_tree_utils.keystr(path)}: it was not "
          "written by the transformation `like` describes, or the two are not "
          "the same tree (both the whole training state, or both the optimizer "
          "state)."
        )
      value = np.full(tuple(leaf.shape), _ADDED_FIELDS[name], leaf.dtype)
    else:
      used += 1
    leaves.append(_convert(value, leaf, path))
  stored = len(jax.tree.leaves(restored))
  if stored != used:
    raise ValueError(
      f"`restored` holds {stored} arrays, `like` places {used} of them: it was "
      "not written by the transformation `like` describes."
    )
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _is_missing_added_field(message: str) -> bool:
  """Whether Orbax refused a target for fields this version added.

  Orbax words it two ways, depending on the target (abstract, concrete, or
  with shardings): "Structure mismatch ... 'step_size'", and "... tree
  structures do not match: opt_state.step_size: ... Target: MISSING".
  """
  mismatch = "Structure mismatch" in message or "structures do not match" in message
  return mismatch and any(
    re.search(rf"\b{name}\b", message) is not None for name in _ADDED_FIELDS
  )


def restore_checkpoint(manager: Any, step: int | None, like: Any) -> Any:
  """Restores an Orbax checkpoint into ``like``, also one written by 0.1.0.

  Restores ``step`` of a checkpoint saved with ``ocp.args.StandardSave``
  (a training state, or any tree holding an optimizer state) with ``like``
  as its target. A checkpoint written by optax_ema 0.1.0 lacks the fields
  this version added (``step_size``), and Orbax refuses it with a
  structure mismatch that cannot name the fix; on that error this
  restores it without a target and converts it with :func:`upgrade_state`.
  Other errors propagate.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``, or the directory of
      one.
    step: the step to restore; ``None`` for the latest.
    like: the tree to restore into, e.g. ``jax.eval_shape(lambda:
      {"params": params, "opt_state": tx.init(params)})``, with shardings
      where the result should be placed.

  Returns:
    The restored tree, with the structure of ``like``.

  Examples:
    >>> import pathlib, tempfile
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import orbax.checkpoint as ocp
    >>> import optax_ema
    >>> params = {"w": jnp.ones(2)}
    >>> tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=0.9)
    >>> old = {  # a state as optax_ema 0.1.0 saved it: no `step_size`
    ...   "inner_state": (optax.EmptyState(), optax.EmptyState()),
    ...   "average": {"w": jnp.full(2, 0.5)},
    ...   "count": jnp.asarray(3, jnp.int32),
    ... }
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> with ocp.CheckpointManager(path) as mngr:
    ...   _ = mngr.save(3, args=ocp.args.StandardSave(old))
    ...   mngr.wait_until_finished()
    >>> like = jax.eval_shape(tx.init, params)
    >>> state = optax_ema.restore_checkpoint(path, None, like)
    >>> print(type(state).__name__, int(state.count), state.average["w"])
    MovingAverageState 3 [0.5 0.5]
  """
  ocp = _orbax.load()  # an optional dependency: ImportError naming it
  if isinstance(manager, (str, os.PathLike)):
    with ocp.CheckpointManager(os.fspath(manager)) as opened:
      return restore_checkpoint(opened, step, like)
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"`manager` holds no checkpoint: {manager.directory}.")
  steps = list(manager.all_steps())
  if step not in steps:
    raise ValueError(
      f"`step`={step!r} is not among the checkpoints of {manager.directory}: "
      f"it holds steps {steps}; pass one of them, or None for the latest."
    )
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(like))
  except ValueError as err:
    if not _is_missing_added_field(str(err)):
      raise
  raw = manager.restore(step, args=ocp.args.StandardRestore())
  return upgrade_state(raw, like)
