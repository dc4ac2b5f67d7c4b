"""Private pytree helpers: leaf predicates, structure checks and masks."""

from __future__ import annotations

import numbers
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


def is_python_number(x: Any) -> bool:
  """A real number that is not a bool (NumPy's real scalars count)."""
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def is_concrete_scalar(x: Any) -> bool:
  """A Python number or a NumPy scalar / 0-d array (not a JAX array)."""
  return is_python_number(x) or (
    isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0
  )


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a tracer: its value is known only in the step."""
  return isinstance(x, jax.core.Tracer)


def is_placeholder(params: Any) -> bool:
  """Whether ``params`` is the stand-in ``optax.tree_map_params`` inits with.

  ``optax.tree_map_params`` calls ``init`` with a leafless placeholder to find
  the parameter-shaped parts of a state; an ``init`` that must look at the
  parameters (masks, several averages) returns the placeholder in their place.
  """
  return type(params).__name__ == "_ParamsPlaceholder"


def flatten(
  tree: Any, is_leaf: Callable[[Any], bool] | None = is_none_or_masked
) -> tuple[list[Any], Any]:
  """``tree``'s leaves (``None``/``MaskedNode`` kept as leaves) and treedef.

  The treedef is typed ``Any``: jaxlib ships no type stubs for ``PyTreeDef``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
  return leaves, treedef


def structure(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """``jax.tree.structure(tree)``, typed ``Any`` (see :func:`flatten`)."""
  return jax.tree.structure(tree, is_leaf=is_leaf)


def keystr(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path) if path else "<root>"


def leaves_with_paths(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """``tree``'s leaves and their paths, ``None``/``MaskedNode`` kept as leaves."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none_or_masked)[0]


def structure_error(reference: Any, tree: Any, name: str, what: str) -> str:
  """Why ``tree`` does not flatten like ``reference``, naming the paths."""
  ref_paths = [p for p, _ in leaves_with_paths(reference)]
  tree_paths = [p for p, _ in leaves_with_paths(tree)]
  prefix = f"`{name}` does not have the structure of {what}:"

  def covered(path: tuple[Any, ...], others: list[tuple[Any, ...]]) -> bool:
    # A leaf of one tree may stand for a whole subtree of the other.
    return any(o[: len(path)] == path or path[: len(o)] == o for o in others)

  missing = [p for p in ref_paths if not covered(p, tree_paths)]
  unexpected = [p for p in tree_paths if not covered(p, ref_paths)]
  parts = []
  if missing:
    names = ", ".join(keystr(p) for p in missing[:3])
    more = ", ..." if len(missing) > 3 else ""
    parts.append(f"{names}{more} {'is' if len(missing) == 1 else 'are'} missing")
  if unexpected:
    names = ", ".join(keystr(p) for p in unexpected[:3])
    more = ", ..." if len(unexpected) > 3 else ""
    verb = "is" if len(unexpected) == 1 else "are"
    parts.append(f"{names}{more} {verb} unexpected in `{name}`")
  if parts:
    return f"{prefix} {'; '.join(parts)}."
  for ref_path, tree_path in zip(ref_paths, tree_paths, strict=False):
    if ref_path != tree_path:
      return (
        f"{prefix} first mismatch at {keystr(ref_path)} (expected) vs "
        f"{keystr(tree_path)} (got)."
      )
  return (
    f"{prefix} the containers differ (expected "
    f"{jax.tree_util.tree_structure(reference, is_leaf=is_none_or_masked)}, got "
    f"{jax.tree_util.tree_structure(tree, is_leaf=is_none_or_masked)})."
  )


def is_float_array(x: Any) -> bool:
  """Whether ``x`` is a floating point array (not a Python scalar)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) and is_float(x)


def check_like(
  reference: Any,
  tree: Any,
  name: str,
  what: str,
  *,
  static_ok: bool = False,
  none_ok: bool = False,
) -> None:
  """Raises a ValueError naming the first path where ``tree`` leaves ``reference``.

  ``reference`` is a state tree shaped like the parameters (it may hold
  ``optax.MaskedNode`` at masked-out leaves and ``None`` at ``None`` leaves);
  ``tree`` is what the caller passed as ``name``. Structures, and the shapes
  of leaves that ``reference`` holds as arrays, must agree. With
  ``static_ok``, ``tree`` may hold anything but a floating point array where
  ``reference`` holds ``None``: the leaves a filter left out of a whole
  model (an Equinox module's activation functions, integer buffers). With
  ``none_ok``, ``tree`` may hold ``None`` where ``reference`` holds an array
  that is not floating point (the gradient ``eqx.filter_grad`` gives an
  integer buffer; ``optax.apply_updates`` leaves such a leaf as it is).
  """
  ref_flat = leaves_with_paths(reference)
  ref_def = flatten(reference)[1]
  try:
    # A MaskedNode in the reference stands for a whole leaf (or subtree).
    tree_leaves = ref_def.flatten_up_to(tree)
  except (ValueError, TypeError):
    raise ValueError(structure_error(reference, tree, name, what)) from None
  for (path, ref_leaf), leaf in zip(ref_flat, tree_leaves, strict=True):
    if ref_leaf is None:
      if static_ok and leaf is not None and not is_float_array(leaf):
        continue
      if static_ok and leaf is not None:
        raise ValueError(
          f"`{name}` does not have the structure of {what}: {keystr(path)} is "
          f"None in the state but a floating point array in `{name}` (the state "
          "was initialised without this leaf, so it holds no average of it). "
          "Initialise the optimizer with this leaf, or pass `params` filtered "
          "as the state was (e.g. `eqx.filter(model, eqx.is_inexact_array)`)."
        )
      if leaf is not None:
        raise ValueError(
          f"`{name}` does not have the structure of {what}: {keystr(path)} is "
          f"None in the state but {type(leaf).__name__} in `{name}`."
        )
      continue
    if isinstance(ref_leaf, optax.MaskedNode):
      continue
    if leaf is None and none_ok and not is_float(ref_leaf):
      continue
    if leaf is None:
      raise ValueError(
        f"`{name}` does not have the structure of {what}: {keystr(path)} is "
        f"None in `{name}` but an array in the state."
      )
    ref_shape, shape = tuple(np.shape(ref_leaf)), tuple(np.shape(leaf))
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
  check_like(reference, updates, "updates", what, none_ok=True)


def expand_mask(mask: Any, params: Any) -> Any:
  """Broadcasts a bool prefix tree (or a callable of params) to ``params``.

  Returns a tree with the structure of ``params`` holding a Python bool at each
  array leaf, or ``None`` when ``mask`` is ``None``.
  """
  if mask is None:
    return None
  prefix = mask(params) if callable(mask) else mask

  def flag_of(flag: Any) -> bool:
    if isinstance(flag, (bool, np.bool_)):
      return bool(flag)
    hint = ""
    if isinstance(flag, (jax.Array, np.ndarray)):
      hint = (
        " (an array: under optax.inject_hyperparams a callable `mask` is "
        "called like a schedule; pass `static_args=('mask',)`)"
      )
    raise TypeError(
      "`mask` must be a pytree prefix of params holding Python bools (or a "
      f"callable returning one); got a leaf {flag!r} of type "
      f"{type(flag).__name__}{hint}."
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


def map_selected(fn: Callable[..., Any], mask: Any, tree: Any) -> Any:
  """``jax.tree.map(fn, tree)`` where masked-out leaves become ``MaskedNode``.

  ``mask`` is :func:`expand_mask`'s result (or ``None``: every leaf is
  selected); ``None`` and ``MaskedNode`` leaves of ``tree`` stay as they are.
  """

  def leaf_fn(selected: Any, x: Any) -> Any:
    if is_none_or_masked(x):
      return x
    return fn(x) if selected else optax.MaskedNode()

  if mask is None:
    return jax.tree.map(lambda x: leaf_fn(True, x), tree, is_leaf=is_none_or_masked)
  return jax.tree.map(leaf_fn, mask, tree, is_leaf=is_none_or_masked)
