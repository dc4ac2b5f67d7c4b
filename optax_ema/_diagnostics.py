"""Scalars worth logging about an averaging state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _averaged
from optax_ema import _core
from optax_ema import _tree_utils


def _drift(average: Any, params: Any) -> jax.Array:
  """``||average - params|| / ||params||`` over the averaged float leaves."""
  diff_sq = jnp.zeros([], jnp.float32)
  ref_sq = jnp.zeros([], jnp.float32)
  avg_leaves, treedef = jax.tree_util.tree_flatten(
    average, is_leaf=_tree_utils.is_none_or_masked
  )
  for a, p in zip(avg_leaves, treedef.flatten_up_to(params), strict=True):
    if _tree_utils.is_none_or_masked(a) or not (
      _tree_utils.is_float(a) and _tree_utils.is_float(p)
    ):
      continue
    a32 = jnp.asarray(a).astype(jnp.promote_types(a.dtype, jnp.float32))
    p32 = jnp.asarray(p).astype(a32.dtype)
    diff_sq += jnp.sum(jnp.abs(a32 - p32) ** 2).astype(jnp.float32)
    ref_sq += jnp.sum(jnp.abs(p32) ** 2).astype(jnp.float32)
  diff = jnp.sqrt(diff_sq)
  ref = jnp.sqrt(ref_sq)
  return jnp.where(ref > 0, diff / jnp.where(ref > 0, ref, 1.0), diff)


def _decay_entries(decay: Any, params: Any, suffix: str, k: int) -> dict[str, Any]:
  out = {}
  if isinstance(decay, _core.PerLeafDecay):
    full = _core.expand_decay(decay, params)
    leaves = jax.tree_util.tree_flatten_with_path(full, is_leaf=_tree_utils.is_none)[0]
    items = [(_tree_utils.keystr(path), d) for path, d in leaves if d is not None]
  else:
    items = [("", decay)]
  for path, d in items:
    d = jnp.asarray(d, jnp.float32)
    out[f"decay{suffix}{path}"] = d
    out[f"window{suffix}{path}"] = jnp.float32(k) / (1.0 - d)
  return out


def diagnostics(
  opt_state: optax.OptState,
  params: optax.Params,
  tx: optax.GradientTransformation | None = None,
  *,
  which: Any = None,
) -> dict[str, jax.Array]:
  """Scalars to log about the average held in an optimizer state.

  Finds the single averaging state in ``opt_state`` (as
  :func:`optax_ema.averaged_params` does) and returns, as float32/int32
  scalars that trace under ``jax.jit``:

  - ``"count"``: the number of updates applied;
  - ``"drift"``: :math:`\\lVert \\bar{x} - x \\rVert / \\lVert x \\rVert` over
    the averaged floating point leaves (the plain distance when
    :math:`\\lVert x \\rVert = 0`), with :math:`\\bar{x}` debiased when the
    average is;
  - with ``tx`` (the transformation :func:`optax_ema.moving_average`
    returned): ``"decay"``, the decay applied at the last averaging step (0
    before any), and ``"window"``, the effective averaging window in steps,
    :math:`k / (1 - d)` with :math:`k` = ``update_every`` (:math:`1/(1-d)`
    by default; ``inf`` for a decay of 1). The state holds no copy of its
    static configuration, so the decay needs ``tx``.

  A state with several averages gives one ``drift``/``decay``/``window``
  entry per average, suffixed ``/<key>`` (or only the one picked by
  ``which``); per-leaf decays give one ``decay``/``window`` entry per leaf,
  suffixed with its path.

  Args:
    opt_state: an optimizer state, or any pytree holding one.
    params: the current parameters.
    tx: optionally, the :func:`optax_ema.moving_average` transformation that
      made the state, for ``"decay"`` and ``"window"``.
    which: for a state with several averages, report only this one (an
      index, a key or a decay value).

  Returns:
    A dict from names to scalars.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), average_decay=0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> stats = optax_ema.diagnostics(state, params, tx)
    >>> print(f"{stats['decay']:.2f} {stats['window']:.1f} {stats['count']}")
    0.90 10.0 1
    >>> print(f"{stats['drift']:.4f}")
    1.2728
  """
  if params is None:
    raise ValueError(
      "`diagnostics` needs the current parameters (for the drift): call "
      "`diagnostics(opt_state, params)`."
    )
  state = _averaged.find_average_state(opt_state, caller="diagnostics")
  reader = _averaged._READERS[type(state)]
  count = jnp.asarray(getattr(state, "count", jnp.zeros([], jnp.int32)))
  out: dict[str, jax.Array] = {"count": count}

  average = getattr(state, "average", None)
  several = isinstance(average, _core.Averages)
  if several:
    indices = list(range(len(average))) if which is None else [average.index(which)]
    keys = [average.keys[i] for i in indices]
    suffixes = [f"/{k}" for k in keys] if which is None else [""]
  else:
    indices, keys, suffixes = [0], [None], [""]

  for key, suffix in zip(keys, suffixes, strict=True):
    avg = reader(state, key) if several else reader(state, which)
    _tree_utils.check_like(avg, params, "params", "the averaged parameters")
    out[f"drift{suffix}"] = _drift(avg, params)

  if tx is not None:
    config = getattr(tx, "averaging_config", None)
    if config is None:
      raise TypeError(
        "`tx` must be the transformation returned by optax_ema.moving_average "
        f"(it carries the decay configuration), got {type(tx).__name__}; pass "
        "that one, not a chain around it (a transformation built by "
        "optax.inject_hyperparams has none: read the decay from its "
        "`hyperparams` instead)."
      )
    if len(config.decays) != (len(average) if several else 1):
      raise ValueError(
        "`tx` does not match `opt_state`: it keeps "
        f"{len(config.decays)} average(s), the state "
        f"{len(average) if several else 1}."
      )
    last = config.last_decays(count)
    for i, suffix in zip(indices, suffixes, strict=True):
      out.update(_decay_entries(last[i], params, suffix, config.update_every))
  return out
