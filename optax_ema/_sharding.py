"""Where every leaf of an optimizer state lives: shardings and memory kinds."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import SingleDeviceSharding

from optax_ema import _tree_utils
from optax_ema import _validation


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
  _validation.check_state_shardings_args(tx, params, param_shardings)
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda p: getattr(p, "sharding", None), params)
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
