"""Private pytree helpers shared by the transformations in this package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def is_none_or_masked(x: Any) -> bool:
  """Leaf predicate: ``None`` and ``optax.MaskedNode`` are kept as leaves."""
  return x is None or isinstance(x, optax.MaskedNode)


def is_none(x: Any) -> bool:
  return x is None


def is_float(x: Any) -> bool:
  """Whether a leaf holds real or complex floating point values."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return isinstance(x, float)
  try:
    return bool(jnp.issubdtype(dtype, jnp.inexact))
  except TypeError:  # extended dtypes such as PRNG keys
    return False


def is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def default_ema_dtype(leaf_dtype: Any, ema_dtype: Any) -> Any:
  """The accumulator dtype of a floating point leaf.

  float16 and bfloat16 leaves accumulate in float32 unless ``ema_dtype`` says
  otherwise; other real floats keep their dtype; complex leaves always keep
  theirs (an explicit real ``ema_dtype`` would drop the imaginary part).
  """
  leaf_dtype = jnp.dtype(leaf_dtype)
  if jnp.issubdtype(leaf_dtype, jnp.complexfloating):
    return leaf_dtype
  if ema_dtype is not None:
    return jnp.dtype(ema_dtype)
  if leaf_dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return leaf_dtype


def keystr(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path) if path else "<root>"


def _flatten_with_kinds(tree: Any) -> tuple[list[Any], Any]:
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none_or_masked)


def check_like(reference: Any, tree: Any, name: str, what: str) -> None:
  """Raises a ValueError naming the first path where ``tree`` leaves ``reference``.

  ``reference`` is a state tree shaped like the parameters (it may hold
  ``optax.MaskedNode`` at masked-out leaves and ``None`` at ``None`` leaves);
  ``tree`` is what the caller passed as ``name``. Structures, and the shapes
  of leaves that ``reference`` holds as arrays, must agree.
  """
  ref_flat, ref_def = _flatten_with_kinds(reference)
  try:
    # Flatten ``tree`` up to the reference's structure: a MaskedNode in the
    # reference stands for a whole leaf (or subtree) of ``tree``.
    tree_leaves = ref_def.flatten_up_to(tree)
  except (ValueError, TypeError):
    tree_flat, _ = _flatten_with_kinds(tree)
    ref_paths = [p for p, _ in ref_flat]
    tree_paths = [p for p, _ in tree_flat]
    for ref_path, tree_path in zip(ref_paths, tree_paths, strict=False):
      if ref_path != tree_path:
        raise ValueError(
          f"`{name}` does not have the structure of {what}: first mismatch at "
          f"{keystr(ref_path)} (expected) vs {keystr(tree_path)} (got)."
        ) from None
    if len(ref_paths) != len(tree_paths):
      longer = ref_paths if len(ref_paths) > len(tree_paths) else tree_paths
      extra = longer[min(len(ref_paths), len(tree_paths))]
      side = "missing from" if longer is ref_paths else "unexpected in"
      raise ValueError(
        f"`{name}` does not have the structure of {what}: {keystr(extra)} is "
        f"{side} `{name}`."
      ) from None
    raise ValueError(
      f"`{name}` does not have the structure of {what}: the containers "
      f"differ (expected {ref_def}, got "
      f"{jax.tree_util.tree_structure(tree, is_leaf=is_none_or_masked)})."
    ) from None
  for (path, ref_leaf), leaf in zip(ref_flat, tree_leaves, strict=True):
    if ref_leaf is None:
      if leaf is not None:
        raise ValueError(
          f"`{name}` does not have the structure of {what}: {keystr(path)} is "
          f"None in the state but {type(leaf).__name__} in `{name}`."
        )
      continue
    if isinstance(ref_leaf, optax.MaskedNode):
      continue
    if leaf is None:
      raise ValueError(
        f"`{name}` does not have the structure of {what}: {keystr(path)} is "
        f"None in `{name}` but an array in the state."
      )
    ref_shape = tuple(np.shape(ref_leaf))
    shape = tuple(np.shape(leaf))
    if ref_shape != shape:
      raise ValueError(
        f"`{name}` does not have the shapes of {what}: {keystr(path)} has "
        f"shape {shape}, expected {ref_shape}."
      )


def check_update_args(caller: str, reference: Any, params: Any, updates: Any) -> None:
  """The checks every averaging ``update`` makes before touching anything.

  ``params`` must be given, and ``params`` and ``updates`` must have the
  structure and shapes of ``reference`` (a params-shaped tree of the state).
  """
  if params is None:
    raise ValueError(
      f"{caller} needs the current parameters: call `tx.update(grads, state, params)`."
    )
  what = "the parameters the state was initialised with"
  check_like(reference, params, "params", what)
  check_like(reference, updates, "updates", what)


def expand_mask(mask: Any, params: Any) -> Any:
  """Broadcasts a bool prefix tree (or a callable of params) to ``params``.

  Returns a tree with the structure of ``params`` holding a Python bool at each
  array leaf (``None`` and ``optax.MaskedNode`` positions are kept as they are),
  or ``None`` when ``mask`` is ``None``.
  """
  if mask is None:
    return None
  prefix = mask(params) if callable(mask) else mask

  def flag_of(flag: Any) -> bool:
    if isinstance(flag, (bool, np.bool_)):
      return bool(flag)
    raise TypeError(
      "`mask` must be a pytree prefix of params holding Python bools (or a "
      f"callable returning one); got a leaf {flag!r} of type "
      f"{type(flag).__name__}."
    )

  def broadcast(flag: Any, subtree: Any) -> Any:
    selected = flag_of(flag)
    return jax.tree.map(lambda _: selected, subtree)

  try:
    return jax.tree.map(broadcast, prefix, params)
  except ValueError as err:
    raise ValueError(
      "`mask` must be a pytree prefix of params (the same containers, with a "
      f"bool where a whole subtree is selected or not): {err}"
    ) from None


def map_selected(fn: Callable[..., Any], mask: Any, tree: Any, *rest: Any) -> Any:
  """``jax.tree.map(fn, tree, *rest)`` where masked-out leaves become MaskedNode.

  ``None`` leaves of ``tree`` stay ``None``; ``optax.MaskedNode`` leaves of
  ``tree`` stay ``MaskedNode``.
  """

  def leaf_fn(x: Any, *others: Any) -> Any:
    if is_none_or_masked(x):
      return x
    return fn(x, *others)

  if mask is None:
    return jax.tree.map(leaf_fn, tree, *rest, is_leaf=is_none_or_masked)

  def masked_fn(selected: Any, x: Any, *others: Any) -> Any:
    if is_none_or_masked(x):
      return x
    if not selected:
      return optax.MaskedNode()
    return fn(x, *others)

  # The expanded mask has the structure of ``tree`` with bools at array leaves
  # and None / MaskedNode kept in place; map with it first so that those stay
  # leaves of the same kind.
  return jax.tree.map(masked_fn, mask, tree, *rest, is_leaf=is_none_or_masked)
