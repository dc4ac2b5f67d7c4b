"""The Orbax items of a snapshot, built from a power-EMA state.

The profiles are cast to the storage dtype by one jitted call whose outputs
keep each input's sharding, memory kind included (offloaded averages stay in
host memory and are cast there), so nothing is gathered to one host and
nothing moves to the accelerator.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from optax_ema import _validation
from optax_ema.posthoc import _run
from optax_ema.posthoc import _snapshots
from optax_ema.posthoc import _state
from optax_ema.posthoc._orbax import ocp

_HOST_MEMORY = ("pinned_host", "unpinned_host")


def _stored_value(leaf: Any) -> Any:
  """The array a profile leaf is stored as, or None (not stored)."""
  if _state.is_none_or_masked(leaf) or _state.is_key(leaf):
    return None
  return leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)


def _is_host(x: jax.Array) -> bool:
  return getattr(x.sharding, "memory_kind", None) in _HOST_MEMORY


@functools.partial(jax.jit, static_argnums=(1,))
def _finite_flags(leaves: list[jax.Array], host: tuple[bool, ...]) -> jax.Array:
  def flag(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))

  flags = []
  for x, on_host in zip(leaves, host, strict=True):
    if on_host:
      with compute_on("device_host"):
        flags.append(flag(x))
    else:
      flags.append(flag(x))
  return jnp.stack(flags)


@functools.lru_cache(maxsize=32)
def _caster(
  storage: np.dtype, host: tuple[bool, ...], shardings: tuple[Any, ...]
) -> Any:
  def cast(xs: list[jax.Array]) -> list[jax.Array]:
    out = []
    for x, on_host in zip(xs, host, strict=True):
      if on_host:  # offloaded: cast in host memory, not on the accelerator
        with compute_on("device_host"):
          out.append(x.astype(storage))
      else:
        out.append(x.astype(storage))
    return out

  return jax.jit(cast, out_shardings=list(shardings))


def cast_to_storage(leaves: list[jax.Array], storage: np.dtype) -> list[jax.Array]:
  """Casts real float leaves to ``storage`` where they live (same shardings).

  Other leaves (integers, complex) are stored as they are.
  """
  real = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not real:
    return list(leaves)
  xs = [leaves[i] for i in real]
  caster = _caster(
    storage, tuple(_is_host(x) for x in xs), tuple(x.sharding for x in xs)
  )
  out = list(leaves)
  for i, y in zip(real, caster(xs), strict=True):
    out[i] = y
  return out


def _first_value(x: jax.Array) -> Any:
  """A replicated scalar's value, in every process (no gather)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x


def storage_tree(
  opt_state: Any, dtype: Any, caller: str, run: str | None
) -> tuple[int, Any, dict]:
  """``(step, {key: stored profile}, meta)`` for the power-EMA state inside.

  ``run`` is the identity of the run, recorded in ``meta``.

  Raises ValueError when a stored average is not finite (e.g. float16
  overflow).
  """
  storage = _validation.check_snapshot_dtype(dtype)
  state = _state.find_power_state(opt_state, caller)
  averages = _state.PowerEmaLayout.stored(state)
  keys = sorted(averages, key=float)
  flat = [
    jax.tree_util.tree_flatten_with_path(averages[k], is_leaf=_state.is_none_or_masked)
    for k in keys
  ]
  treedef = flat[0][1]
  values = [[_stored_value(leaf) for _, leaf in f[0]] for f in flat]
  present = [i for i, v in enumerate(values[0]) if v is not None]
  arrays = [values[j][i] for j in range(len(keys)) for i in present]
  cast = cast_to_storage(arrays, storage)
  _check_finite(cast, [flat[0][0][i][0] for i in present] * len(keys), storage)
  it = iter(cast)
  for j in range(len(keys)):
    for i in present:
      values[j][i] = next(it)
  tree = {
    k: jax.tree_util.tree_unflatten(treedef, values[j]) for j, k in enumerate(keys)
  }
  step = int(_first_value(_state.PowerEmaLayout.count(state)))
  sigma_rels = [float(k) for k in keys]
  meta = {
    "format": _snapshots.FORMAT,
    "step": step,
    "keys": keys,
    "sigma_rels": sigma_rels,
    "dtype": storage.name,
    "run": run,
  }
  return step, tree, meta


def _check_finite(arrays: list[jax.Array], paths: list[Any], storage: np.dtype) -> None:
  floats = [i for i, x in enumerate(arrays) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not floats:
    return
  selected = [arrays[i] for i in floats]
  flags = _first_value(_finite_flags(selected, tuple(_is_host(x) for x in selected)))
  bad = [floats[i] for i, ok in enumerate(np.asarray(flags)) if not ok]
  if bad:
    name = _state.keystr(paths[bad[0]])
    raise ValueError(
      f"The power-EMA average at {name} is not finite in {storage.name} (the "
      "parameters diverged, or exceed its range): if they exceed the float16 "
      "range (65504), save with `dtype=np.float32`."
    )


def snapshot_items(
  opt_state: Any, run: _run.SnapshotRun, *, dtype: Any = np.float16
) -> dict[str, Any]:
  """The Orbax items of a snapshot, to save with your own CheckpointManager.

  For a training loop that already checkpoints with an
  ``orbax.checkpoint.CheckpointManager``: claim the manager's directory for
  this run with a :class:`SnapshotRun` (as a :class:`SnapshotWriter` does:
  it refuses a directory holding another run's snapshots, locks it, and
  gives the run identity every snapshot records), add these items to the
  ``ocp.args.Composite`` of the steps that should also be snapshots, and
  read them with :func:`load_snapshots` / :func:`reconstruct` on that
  directory. Keep every such step (no ``max_to_keep`` that would delete
  them), or write snapshots to a directory of their own with
  :class:`SnapshotWriter` instead.

  Args:
    opt_state: an optimizer state holding one :class:`optax_ema.PowerEmaState`.
    run: the open :class:`SnapshotRun` of the manager's directory.
    dtype: storage dtype of the averaged leaves (float16 by default, as EDM2).

  Returns:
    ``{"power_ema": ocp.args.PyTreeSave(...), "power_ema_meta":
    ocp.args.JsonSave(...)}``.

  Raises:
    TypeError: ``run`` is not a :class:`SnapshotRun`.
    ValueError: no power-EMA state in ``opt_state``; a stored average is not
      finite in ``dtype``; ``run`` is closed.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import orbax.checkpoint as ocp
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0))
    >>> state, grads = tx.init(params), {"w": -jnp.ones(2)}
    >>> with tempfile.TemporaryDirectory() as d:
    ...   with posthoc.SnapshotRun(d) as run:
    ...     with ocp.CheckpointManager(d) as manager:
    ...       for step in range(1, 5):
    ...         updates, state = tx.update(grads, state, params)
    ...         params = optax.apply_updates(params, updates)
    ...         _ = manager.save(step, args=ocp.args.Composite(
    ...           params=ocp.args.StandardSave(params),
    ...           **posthoc.snapshot_items(state, run),
    ...         ))
    ...   print([s.step for s in posthoc.load_snapshots(d)])
    [1, 2, 3, 4]
  """
  _validation.check_snapshot_run(run, _run.SnapshotRun)
  if run.closed:
    raise ValueError(
      f"`run` ({str(run.directory)!r}) is closed: save snapshot items inside "
      "its `with` block."
    )
  _, tree, meta = storage_tree(opt_state, dtype, "snapshot_items", run.identity)
  return {
    _snapshots.ITEM: ocp.args.PyTreeSave(tree),
    _snapshots.META_ITEM: ocp.args.JsonSave(meta),
  }
