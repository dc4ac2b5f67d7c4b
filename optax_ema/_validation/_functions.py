"""Checks of the arguments of the package's functions beside the transforms.

:func:`optax_ema.average_op`, :func:`optax_ema.diagnostics`,
:func:`optax_ema.state_shardings` and the Flax helpers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from optax_ema import _tree_utils
from optax_ema import _warn


def checked_batches(batches: Any) -> list[Any]:
  """The batches of the BatchNorm recomputation as a list: at least one."""
  batches = list(batches)
  if not batches:
    raise ValueError("`batches` must hold at least one batch, got none.")
  return batches


def check_float_average(average_var: Any) -> None:
  """``average_op``'s average: floating point leaves (None/MaskedNode pass)."""
  for a in jax.tree.leaves(average_var, is_leaf=_tree_utils.is_none_or_masked):
    if _tree_utils.is_none_or_masked(a):
      continue
    if not _tree_utils.is_float(a if hasattr(a, "dtype") else jnp.asarray(a)):
      raise TypeError(
        "`average_var` leaves must be floating point (an integer average "
        f"would truncate), got dtype {jnp.asarray(a).dtype}."
      )


def check_diagnostics_args(tx: Any, params: Any) -> None:
  """``diagnostics``: no ``tx`` (deprecated), and the current ``params``."""
  if tx is not None:
    _warn.warn(
      "`diagnostics` no longer needs `tx`: the state records the decay of its "
      "last averaging step. Call `diagnostics(opt_state, params)`.",
      DeprecationWarning,
    )
  if params is None:
    raise ValueError(
      "`diagnostics` needs the current parameters (for the drift): call "
      "`diagnostics(opt_state, params)`."
    )


def check_train_state(state: Any) -> None:
  """A Flax ``TrainState``: with ``params``, ``opt_state`` and ``replace``."""
  missing = [
    name for name in ("params", "opt_state", "replace") if not hasattr(state, name)
  ]
  if missing:
    raise TypeError(
      "`state` must be a Flax TrainState (with `params`, `opt_state` and "
      f"`replace`), got {type(state).__name__} without "
      f"{', '.join(f'`{m}`' for m in missing)}."
    )


def check_nnx_optimizer(optimizer: Any) -> None:
  """An ``nnx.Optimizer``: with ``opt_state`` and ``wrt``."""
  if not (hasattr(optimizer, "opt_state") and hasattr(optimizer, "wrt")):
    raise TypeError(
      "`optimizer` must be an nnx.Optimizer (with `opt_state` and `wrt`), got "
      f"{type(optimizer).__name__}."
    )


def _check_tx(tx: Any) -> None:
  if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
    return
  hint = ""
  owner = getattr(tx, "__self__", None)
  if getattr(tx, "__name__", "") in ("init", "init_fn") or owner is not None:
    hint = " (`tx.init` was passed: pass `tx` itself)"
  elif callable(tx):
    hint = " (a function was passed: pass the transformation whose `init` it is)"
  raise TypeError(
    "`tx` must be an optax.GradientTransformation (an object with `init` and "
    f"`update`), got {type(tx).__name__}{hint}: "
    "`optax_ema.state_shardings(tx, params)`."
  )


def _is_sharding(x: Any) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def _check_param_shardings(param_shardings: Any, params: Any) -> None:
  """``param_shardings`` must be a tree of shardings shaped like ``params``."""
  specs = [
    _tree_utils.keystr(path)
    for path, s in jax.tree_util.tree_flatten_with_path(
      param_shardings, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    if isinstance(s, PartitionSpec)
  ]
  if specs:
    raise TypeError(
      f"`param_shardings` holds PartitionSpecs (at {', '.join(specs[:3])}), "
      "which name mesh axes but no mesh: give shardings, e.g. "
      "`jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)`."
    )
  try:
    _tree_utils.flatten(params)[1].flatten_up_to(param_shardings)
  except (ValueError, TypeError):
    message = _tree_utils.structure_error(
      params, param_shardings, "param_shardings", "`params`"
    )
    raise ValueError(
      f"{message} Give one sharding per parameter, in a tree shaped like `params`."
    ) from None
  bad = [
    f"{_tree_utils.keystr(path)} ({type(s).__name__})"
    for path, s in jax.tree_util.tree_flatten_with_path(
      param_shardings, is_leaf=_is_sharding
    )[0]
    if not _is_sharding(s)
  ]
  if bad:
    raise TypeError(
      "`param_shardings` must hold a jax.sharding.Sharding per parameter, got "
      f"{', '.join(bad[:3])}."
    )


def check_state_shardings_args(tx: Any, params: Any, param_shardings: Any) -> None:
  """``state_shardings``: a transformation, and a sharding for every param.

  Either ``param_shardings``, a tree of shardings shaped like ``params``, or
  params that carry their own.
  """
  _check_tx(tx)
  if param_shardings is not None:
    _check_param_shardings(param_shardings, params)
    return
  unsharded = [
    _tree_utils.keystr(path)
    for path, s in jax.tree_util.tree_flatten_with_path(params)[0]
    if getattr(s, "sharding", None) is None
  ]
  if unsharded:
    raise ValueError(
      f"`params` carry no sharding at {', '.join(unsharded[:3])} (abstract "
      "params from jax.eval_shape have none): pass `param_shardings=`, a "
      "tree of shardings shaped like `params`."
    )
