"""Where every leaf of an optimizer state lives: shardings and memory kinds."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import SingleDeviceSharding

from optax_ema import _tree_utils


def _replicated(param_shardings: Any) -> Any:
  """A replicated sharding on the params' devices."""
  for s in jax.tree.leaves(param_shardings, is_leaf=_is_sharding):
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, PartitionSpec())
    if isinstance(s, jax.sharding.Sharding):
      return SingleDeviceSharding(next(iter(s.device_set)))
  return SingleDeviceSharding(jax.devices()[0])


def _is_sharding(x: Any) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def _check_transformation(tx: Any) -> None:
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


def state_shardings(
  tx: optax.GradientTransformation,
  params: optax.Params,
  param_shardings: Any = None,
) -> Any:
  """The sharding of every leaf of ``tx.init(params)``, memory kinds included.

  ``jax.eval_shape(tx.init, params)`` keeps neither the memory kind of an
  offloaded average (``offload=True``) nor, with a classic ``Mesh``, the
  shardings, and ``optax.tree_map_params`` cannot tell an average from an
  optimizer's moments. This gives each parameter-shaped part of the state
  (averages, moments) its parameter's sharding, in host memory
  (``pinned_host``) where the state keeps it there, and everything else
  (counts, debias weights, hyperparameters) a replicated sharding on the
  same devices: what ``jax.jit(tx.init, out_shardings=...)``, a jitted step's
  ``out_shardings`` and an Orbax restore target need.

  Args:
    tx: the transformation (``optax_ema.moving_average(...)``, or any chain
      or wrapper holding one).
    params: the params, concrete or abstract (``jax.ShapeDtypeStruct``).
    param_shardings: a tree of shardings shaped like ``params``; by default
      the params' own ``sharding``.

  Returns:
    A tree with the structure of ``tx.init(params)`` holding
    ``jax.sharding.Sharding`` leaves (``optax.MaskedNode`` where the state
    has one).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.ones((4, 2))}
    >>> tx = optax_ema.moving_average(optax.adam(1e-3), 0.999, offload=True)
    >>> shardings = optax_ema.state_shardings(tx, params)
    >>> adam_mu = shardings.inner_state[0].mu
    >>> print(shardings.average["w"].memory_kind, adam_mu["w"].memory_kind)
    pinned_host device
    >>> abstract = jax.eval_shape(tx.init, params)
    >>> like = lambda x, s: jax.ShapeDtypeStruct(
    ...   x.shape, x.dtype, sharding=s
    ... )
    >>> target = jax.tree.map(like, abstract, shardings)
    >>> print(target.average["w"].sharding.memory_kind)
    pinned_host
  """
  _check_transformation(tx)
  if param_shardings is not None:
    _check_param_shardings(param_shardings, params)
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda p: getattr(p, "sharding", None), params)
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
  replicated = _replicated(param_shardings)
  abstract = jax.eval_shape(tx.init, params)

  def param_leaf(x: Any, sharding: Any) -> Any:
    return x if isinstance(x, optax.MaskedNode) else sharding

  shardings = optax.tree_map_params(
    tx,
    param_leaf,
    abstract,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=_tree_utils.is_none_or_masked,
  )
  # The memory space of each leaf, as the traced init places it.
  spaces = [a.memory_space for a in jax.make_jaxpr(tx.init)(params).out_avals]
  leaves, treedef = _tree_utils.flatten(shardings, is_leaf=_is_sharding)
  arrays = [s for s in leaves if _is_sharding(s)]
  if len(arrays) != len(spaces):
    raise ValueError(
      f"`tx`'s state has {len(spaces)} arrays but `optax.tree_map_params` "
      f"placed {len(arrays)}: is `param_shardings` shaped like `params`?"
    )
  placed = iter(
    s.with_memory_kind("pinned_host") if space == jax.memory.Space.Host else s
    for s, space in zip(arrays, spaces, strict=True)
  )
  return treedef.unflatten([next(placed) if _is_sharding(s) else s for s in leaves])
