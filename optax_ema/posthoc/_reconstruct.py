"""Streaming reconstruction: the weighted sum of stored profiles, one at a time.

Each stored profile is read once, in chunks of leaves, directly into the
target sharding (or into NumPy on the host), added to an accumulator with its
coefficient and dropped, so memory holds the accumulator plus one chunk in the
storage dtype, whatever the number of snapshots. Accumulation is in float32 (in the
storage dtype promoted to float32), enough for float16 storage: see the
post-hoc guide for the error against float64.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema.posthoc import _snapshots
from optax_ema.posthoc import _solver
from optax_ema.posthoc import _state
from optax_ema.posthoc._orbax import ocp

Key = _snapshots.Key


def _split(snap: _snapshots.Snapshot) -> tuple[dict[Key, Any], dict[Key, Any]]:
  """The stored leaves: (averaged float leaves, latest-value leaves)."""
  flat = ocp.tree.to_flat_dict(snap.tree)
  averaged = {k: v for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
  latest = {k: v for k, v in flat.items() if k not in averaged}
  return averaged, latest


def _acc_dtype(dtype: Any) -> np.dtype:
  return np.promote_types(dtype, np.float32)


# The most bytes (in the storage dtype) restored at once: each profile is read
# in chunks of leaves of about this size, so memory holds the accumulator and
# one chunk (a leaf larger than this is a chunk of its own).
CHUNK_BYTES = 64 * 2**20
_BLOCK = 2**20  # elements per step of the host accumulation (4 MiB scratch)


def chunks(specs: dict[Key, Any]) -> list[list[Key]]:
  """The leaf keys of ``specs``, grouped into restores of ~CHUNK_BYTES."""
  out: list[list[Key]] = [[]]
  size = 0
  for k, v in specs.items():
    nbytes = int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    if out[-1] and size + nbytes > CHUNK_BYTES:
      out.append([])
      size = 0
    out[-1].append(k)
    size += nbytes
  return [c for c in out if c]


def _add_scaled(acc: np.ndarray, x: np.ndarray, c: float, scratch: np.ndarray) -> None:
  """``acc += c * x`` in ``acc``'s dtype, in blocks: no array-sized temporaries."""
  a, b = acc.reshape(-1), np.asarray(x).reshape(-1)
  coefficient = acc.dtype.type(c)
  for start in range(0, a.size, _BLOCK):
    stop = min(start + _BLOCK, a.size)
    term = scratch[: stop - start]
    np.multiply(b[start:stop], coefficient, out=term, dtype=acc.dtype)
    np.add(a[start:stop], term, out=a[start:stop])


def _host(
  snaps: Sequence[_snapshots.Snapshot], weights: _solver.ReconstructionWeights
) -> Any:
  """NumPy result with the stored structure (nested dicts and lists)."""
  rows = _solver.rows(snaps, weights.step)
  last = rows[-1][0]
  averaged, latest = _split(last)
  as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
  acc = {k: np.zeros(v.shape, _acc_dtype(v.dtype)) for k, v in averaged.items()}
  scratch = {
    dtype: np.empty(_BLOCK, dtype) for dtype in {a.dtype for a in acc.values()}
  }
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    for (snap, j), c in zip(rows, weights.coefficients, strict=True):
      for keys in chunks(averaged):
        values = _snapshots.restore_profile(
          checkpointer, snap, j, dict.fromkeys(keys, as_numpy)
        )
        for k in keys:
          _add_scaled(acc[k], values.pop(k), float(c), scratch[acc[k].dtype])
    if latest:
      acc.update(
        _snapshots.restore_profile(
          checkpointer, last, 0, dict.fromkeys(latest, as_numpy)
        )
      )
  flat = ocp.tree.to_flat_dict(last.tree)
  return ocp.tree.from_flat_dict({k: acc[k] for k in flat}, target=last.tree)


def _like_keys(like: Any) -> tuple[list[Any], Any, dict[Key, int]]:
  leaves, treedef = jax.tree_util.tree_flatten(like, is_leaf=_state.is_none)
  index = ocp.tree.to_flat_dict(
    jax.tree_util.tree_unflatten(treedef, range(len(leaves)))
  )
  return leaves, treedef, {k: int(i) for k, i in index.items()}


def _sharding(leaf: Any) -> jax.sharding.Sharding:
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, jax.sharding.Sharding):
    return sharding
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _dtype(leaf: Any) -> np.dtype:
  dtype = getattr(leaf, "dtype", None)
  return np.dtype(dtype) if dtype is not None else np.result_type(leaf)


def _is_concrete(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex))


def _plan(
  snap: _snapshots.Snapshot, like: Any
) -> tuple[list[Any], Any, dict[Key, int], dict[Key, int]]:
  """Matches ``like`` to the stored leaves; raises on any mismatch."""
  leaves, treedef, index = _like_keys(like)
  averaged, latest = _split(snap)
  missing = sorted((set(averaged) | set(latest)) - set(index))
  if missing:
    raise ValueError(
      f"`like` does not have the structure of the snapshots: {'/'.join(missing[0])} "
      "is stored in the snapshots but missing from `like`."
    )
  # The stored tree keeps None where a leaf is not stored (masked out, None,
  # PRNG key): a leaf of `like` that is not in it at all is new (a None leaf
  # of `like` carries no value and comes back as None).
  known = ocp.tree.to_flat_dict(snap.tree, is_leaf=_state.is_none)
  absent = sorted(k for k in set(index) - set(known) if leaves[index[k]] is not None)
  if absent:
    names = ", ".join("/".join(k) for k in absent[:3])
    raise ValueError(
      f"`like` does not have the structure of the snapshots: {names} "
      f"{'is' if len(absent) == 1 else 'are'} in `like` but in no snapshot "
      "(a parameter added after the snapshots were taken?). Reconstruct with "
      "`like` of the trained parameters' structure, then add the new leaves."
    )
  for k, i in index.items():
    leaf = leaves[i]
    stored = averaged.get(k, latest.get(k))
    name = "/".join(k)
    if stored is None:
      if leaf is not None and not _is_concrete(leaf):
        raise ValueError(
          f"`like` has no value for {name}: the snapshots store none there (a "
          "masked-out, None or PRNG-key leaf), so pass the concrete value in "
          f"`like` instead of a {type(leaf).__name__}."
        )
      continue
    if tuple(np.shape(leaf)) != tuple(stored.shape):
      raise ValueError(
        f"`like` does not have the shapes of the snapshots: {name} has shape "
        f"{tuple(np.shape(leaf))}, the snapshots {tuple(stored.shape)}."
      )
    if k in averaged and not jnp.issubdtype(_dtype(leaf), jnp.inexact):
      raise ValueError(
        f"`like` has dtype {_dtype(leaf)} at {name}, where the snapshots "
        "store a floating point average: give a floating point dtype."
      )
  return (
    leaves,
    treedef,
    {k: index[k] for k in averaged},
    {k: index[k] for k in latest},
  )


def _axpy_impl(acc: dict[Key, jax.Array], x: dict[Key, jax.Array], c: Any) -> Any:
  return {k: a + x[k].astype(a.dtype) * jnp.asarray(c, a.dtype) for k, a in acc.items()}


# acc <- acc + c x, in place: the accumulator is donated.
_axpy = jax.jit(_axpy_impl, donate_argnums=0)


def _zeros(specs: dict[Key, jax.ShapeDtypeStruct]) -> dict[Key, jax.Array]:
  return {k: jnp.zeros(s.shape, s.dtype, device=s.sharding) for k, s in specs.items()}


def _sharded(
  snaps: Sequence[_snapshots.Snapshot],
  weights: _solver.ReconstructionWeights,
  like: Any,
) -> Any:
  """jax.Array result in ``like``'s shardings, accumulated on device."""
  rows = _solver.rows(snaps, weights.step)
  last = rows[-1][0]
  leaves, treedef, averaged, latest = _plan(last, like)
  stored = ocp.tree.to_flat_dict(last.tree)
  targets = {k: _sharding(leaves[i]) for k, i in averaged.items()}
  acc_specs = {
    k: jax.ShapeDtypeStruct(stored[k].shape, _acc_dtype(stored[k].dtype), sharding=s)
    for k, s in targets.items()
  }
  restore = {k: ocp.ArrayRestoreArgs(sharding=s) for k, s in targets.items()}
  out = list(leaves)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    acc = _zeros(acc_specs)
    groups = chunks({k: stored[k] for k in averaged})
    for (snap, j), c in zip(rows, weights.coefficients, strict=True):
      for keys in groups:
        x = _snapshots.restore_profile(
          checkpointer, snap, j, {k: restore[k] for k in keys}
        )
        acc |= _axpy({k: acc.pop(k) for k in keys}, x, float(c))
        del x
    if latest:
      values = _snapshots.restore_profile(
        checkpointer,
        last,
        0,
        {
          k: ocp.ArrayRestoreArgs(
            sharding=_sharding(leaves[i]), dtype=_dtype(leaves[i])
          )
          for k, i in latest.items()
        },
      )
      for k, i in latest.items():
        out[i] = values[k]
  for k, i in averaged.items():
    out[i] = _cast(acc.pop(k), _dtype(leaves[i]), targets[k])
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=64)
def _caster(dtype: np.dtype, sharding: jax.sharding.Sharding) -> Any:
  return jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)


def _cast(x: jax.Array, dtype: np.dtype, sharding: jax.sharding.Sharding) -> jax.Array:
  if x.dtype == dtype:
    return x
  y = _caster(dtype, sharding)(x)
  x.delete()
  return y


def reconstruct(
  directory_or_snapshots: str
  | os.PathLike[str]
  | _snapshots.Snapshot
  | Iterable[str | os.PathLike[str] | _snapshots.Snapshot],
  sigma_rel: float,
  step: int | None = None,
  *,
  like: Any = None,
) -> Any:
  """Synthesizes the power-EMA average of any width from saved snapshots.

  Finds the coefficients :math:`c_k` (summing to one) that best express the
  target profile (width ``sigma_rel``, ending at ``step``) as a combination
  of the stored profiles (:func:`reconstruction_weights`, EDM2's
  Algorithm 3) and returns :math:`\\sum_k c_k \\hat{x}_k`, reading each stored
  profile once and accumulating in float32. Leaves that are not averaged
  (integers) come from the last snapshot used. A tracked ``sigma_rel`` at a
  snapshot step returns that profile's stored average; widths between the
  tracked ones are interpolated, others extrapolated less accurately (check
  ``reconstruction_weights(...).fit_error``).

  Args:
    directory_or_snapshots: as for :func:`load_snapshots`.
    sigma_rel: the target width, in ``(0, 0.30028]``.
    step: the step the target average ends at, one of the snapshot steps
      (default: the last one); only snapshots up to it are used.
    like: optional target tree with the structure of the parameters:
      ``jax.ShapeDtypeStruct`` leaves with shardings (e.g. from
      ``jax.eval_shape`` and the parameters' shardings) and/or concrete
      arrays. With it, each leaf comes back as a ``jax.Array`` with that
      leaf's sharding and dtype, restored shard by shard into it (no host
      holds the whole model), and leaves the snapshots do not store
      (masked-out, ``None``, PRNG keys) are taken from ``like``, which must
      hold concrete values there.

  Returns:
    The synthesized parameters: a tree like ``like``, or else NumPy arrays
    in the stored structure (nested dicts and lists, ``None`` where nothing
    is stored).

  Raises:
    ValueError: see :func:`reconstruction_weights`; ``like`` with another
      structure or other shapes than the snapshots (a leaf the snapshots
      store that ``like`` lacks, or one of ``like`` that no snapshot has), or
      without a value where the snapshots store none.

  Warns:
    UserWarning: the fit error of the target profile is above 0.1, as for
      :func:`reconstruction_weights`.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(0.01), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   f32 = jnp.float32
    ...   with posthoc.SnapshotWriter(d, every=20, dtype=f32) as writer:
    ...     for step in range(1, 101):
    ...       updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...       params = optax.apply_updates(params, updates)
    ...       _ = writer(state, step)
    ...   avg = posthoc.reconstruct(d, sigma_rel=0.10, like=params)
    ...   host = posthoc.reconstruct(d, sigma_rel=0.07)
    >>> direct = optax_ema.averaged_params(state, params, which=0.10)
    >>> print(f"{avg['w'][0]:.4f} {direct['w'][0]:.4f} {host['w'][0]:.2f}")
    0.8930 0.8930 0.93

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, section 3.2 and appendix C.3.
  """
  snaps = _snapshots.load_snapshots(directory_or_snapshots)
  weights = _solver.select_weights(snaps, sigma_rel, step)
  return combine(snaps, weights, like)


def combine(
  snaps: Sequence[_snapshots.Snapshot],
  weights: _solver.ReconstructionWeights,
  like: Any = None,
) -> Any:
  """The weighted sum of stored profiles (``reconstruct`` once weighed)."""
  if like is None:
    return _host(snaps, weights)
  return _sharded(snaps, weights, like)
