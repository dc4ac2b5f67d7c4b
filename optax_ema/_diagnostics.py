"""Scalars worth logging about an averaging state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _reading
from optax_ema import _states
from optax_ema import _tree_utils
from optax_ema import _validation
from optax_ema import _variables


def _drift(average: Any, params: Any) -> jax.Array:
  """``||average - params|| / ||params||`` over the averaged float leaves."""
  diff_sq = jnp.zeros([], jnp.float32)
  ref_sq = jnp.zeros([], jnp.float32)
  avg_leaves, treedef = _tree_utils.flatten(average)
  for a, p in zip(avg_leaves, treedef.flatten_up_to(params), strict=True):
    if _tree_utils.is_none_or_masked(a) or not (
      _tree_utils.is_float(a) and _tree_utils.is_float(p)
    ):
      continue
    a32 = jnp.asarray(a).astype(jnp.promote_types(a.dtype, jnp.float32))
    p32 = jnp.asarray(p).astype(a32.dtype)
    diff_sq += jnp.sum(jnp.abs(a32 - p32) ** 2).astype(jnp.float32)
    ref_sq += jnp.sum(jnp.abs(p32) ** 2).astype(jnp.float32)
  diff, ref = jnp.sqrt(diff_sq), jnp.sqrt(ref_sq)
  return jnp.where(ref > 0, diff / jnp.where(ref > 0, ref, 1.0), diff)


def _step_entries(view: _reading.View, suffix: str) -> dict[str, jax.Array]:
  size = jnp.asarray(view.step_size, jnp.float32)
  if size.ndim == 0:
    items = [("", size)]
  else:  # per-leaf decays: one entry per array leaf, in jax.tree.leaves order
    paths = [
      _tree_utils.keystr(path)
      for path, leaf in _tree_utils.leaves_with_paths(view.tree)
      if not _tree_utils.is_none_or_masked(leaf)
    ]
    items = [(path, size[i]) for i, path in enumerate(paths)]
  out = {}
  for path, w in items:
    out[f"decay{suffix}{path}"] = 1.0 - w
    out[f"window{suffix}{path}"] = 1.0 / w
  return out


def diagnostics(
  opt_state: optax.OptState,
  params: optax.Params,
  tx: Any = None,
  *,
  which: Any = None,
) -> dict[str, jax.Array]:
  """Scalars to log about the average held in an optimizer state.

  Finds the single averaging state in ``opt_state`` (as
  :func:`optax_ema.averaged_params` does: bare, inside ``optax.chain``,
  ``optax.MultiSteps``, ``optax.inject_hyperparams``, a ``TrainState``...)
  and returns, as float32/int32 scalars that trace under ``jax.jit``:

  - ``"count"``: the number of updates applied;
  - ``"drift"``: :math:`\\lVert \\bar{x} - x \\rVert / \\lVert x \\rVert` over
    the averaged floating point leaves (the plain distance when
    :math:`\\lVert x \\rVert = 0`), with :math:`\\bar{x}` debiased when the
    average is;
  - ``"decay"``: the per-step decay of the last averaging step (0 before
    any; with ``update_every=k`` the average moved by ``decay ** k``; for
    SWA, the weight of the mean spread over the period), and
  - ``"window"``: the effective averaging window in steps,
    :math:`1 / (1 - d)` (``inf`` for a decay of 1).

  The state records what its last averaging step did, so no transformation
  needs to be passed. A state with several averages gives one
  ``drift``/``decay``/``window`` entry per average, suffixed ``/<key>`` (or
  only the one picked by ``which``); per-leaf decays give one
  ``decay``/``window`` entry per leaf, suffixed with its path. A state
  converted by :func:`optax_ema.upgrade_state` from optax_ema 0.1.0 reads
  NaN decay and window until its next averaging step, and so does a step
  whose decay, known only in the step (``optax.inject_hyperparams``,
  ``jit``), was outside [0, 1] or NaN: it did not average.

  Args:
    opt_state: an optimizer state, or any pytree holding one.
    params: the current parameters, as :func:`optax_ema.averaged_params`
      takes them (a whole Equinox module, an NNX ``State`` of variables).
    tx: no longer needed (ignored, with a ``DeprecationWarning``).
    which: for a state with several averages, report only this one (an
      index, a key or a decay value).

  Returns:
    A dict from names to scalars.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(
    ...   optax.clip(1.0),
    ...   optax_ema.moving_average(optax.sgd(1.0), average_decay=0.9),
    ... )
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> stats = optax_ema.diagnostics(state, params)
    >>> decay, window = stats["decay"], stats["window"]
    >>> print(f"{decay:.2f} {window:.1f} {stats['count']}")
    0.90 10.0 1
    >>> print(f"{stats['drift']:.4f}")
    1.2728
  """
  _validation.check_diagnostics_args(tx, params)
  opt_state = _variables.strip(opt_state)
  params = _variables.strip(params)
  state = _reading.find_average_state(opt_state, caller="diagnostics")
  count = _states.layout_of(state).count(state)
  out: dict[str, jax.Array] = {"count": jnp.asarray(count)}
  _, all_views = _reading.views(state)
  if which is not None or len(all_views) == 1:
    chosen = [(_reading.pick(state, which), "")]
  else:
    chosen = [(v, f"/{v.key}") for v in all_views]
  for view, suffix in chosen:
    _tree_utils.check_like(
      view.tree, params, "params", "the averaged parameters", static_ok=True
    )
    average = view.tree if view.empty is None else _reading.with_params(view, params)
    out[f"drift{suffix}"] = _drift(average, params)
    out.update(_step_entries(view, suffix))
  return out
