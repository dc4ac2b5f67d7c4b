"""Reading snapshots: Orbax checkpoint steps holding power-EMA profiles.

A snapshot is one committed step of an Orbax checkpoint directory with two
items: ``power_ema`` (a PyTree checkpoint ``{repr(sigma_rel): profile}``,
each profile a tree like the parameters) and ``power_ema_meta`` (JSON). See
:mod:`optax_ema.posthoc` for the layout. Steps that Orbax has not committed
(its temporary directories of an interrupted write) are never read.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import pathlib
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import numpy as np

from optax_ema import _power_math
from optax_ema.posthoc._orbax import ocp

FORMAT = "optax_ema.posthoc/3"
FORMAT_2 = "optax_ema.posthoc/2"  # before run identities: still read
ITEM = "power_ema"
META_ITEM = "power_ema_meta"

PathLike = str | os.PathLike[str]
Key = tuple[str, ...]


class Snapshot(NamedTuple):
  """The metadata of one snapshot (no arrays are read).

  Attributes:
    step: the number of updates the averages cover (``PowerEmaState.count``).
    sigma_rels: float64 vector, the widths of the stored profiles.
    gammas: float64 vector, their exponents.
    keys: the item keys of the profiles, ``repr(sigma_rel)`` as in
      :attr:`optax_ema.PowerEmaState.averages`.
    dtype: the storage dtype of the averaged (floating point) leaves.
    tree: the stored tree of one profile: nested dicts and lists (as Orbax
      stores any pytree) of ``jax.ShapeDtypeStruct``, ``None`` where nothing
      is stored (masked-out, ``None`` and PRNG-key leaves).
    path: the Orbax step directory.
    run: the identity of the training run that wrote it (a 32-digit hex
      string); ``None`` for snapshots of format ``optax_ema.posthoc/2``.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.10))
    >>> params = {"w": jnp.ones(3)}
    >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   _ = posthoc.save_snapshot(d, state)
    ...   (snap,) = posthoc.load_snapshots(d)
    >>> print(snap.step, snap.sigma_rels, snap.keys)
    1 [0.05 0.1 ] ('0.05', '0.1')
    >>> print(snap.dtype, snap.tree["w"].shape)
    float16 (3,)
    >>> print(len(snap.run))
    32
  """

  step: int
  sigma_rels: np.ndarray
  gammas: np.ndarray
  keys: tuple[str, ...]
  dtype: str
  tree: Any
  path: pathlib.Path
  run: str | None = None


class _Writer(Protocol):
  def wait_until_finished(self) -> None: ...


# The open snapshot writers of this process, by resolved directory: a read of
# a directory waits for its writer's pending writes first, so a process always
# sees every snapshot it saved before.
OPEN_WRITERS: dict[pathlib.Path, _Writer] = {}


def wait_for_writers(directory: pathlib.Path | None = None) -> None:
  """Waits for this process's pending snapshot writes (to ``directory``)."""
  if directory is None:
    writers = list(OPEN_WRITERS.values())
  else:
    writer = OPEN_WRITERS.get(directory.resolve())
    writers = [] if writer is None else [writer]
  for w in writers:
    w.wait_until_finished()


def read(step_dir: pathlib.Path) -> Snapshot:
  # A committed step never changes: read each once per process (Orbax's
  # metadata reader holds on to memory at every call).
  stat = (step_dir / META_ITEM).stat()
  return _read_once(step_dir.resolve(), stat.st_ino, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _read_once(step_dir: pathlib.Path, inode: int, mtime_ns: int) -> Snapshot:
  del inode, mtime_ns  # the cache key: a rewritten step is read again
  try:
    return _parse(step_dir)
  except (KeyError, TypeError, json.JSONDecodeError) as err:
    raise ValueError(
      f"The snapshot metadata in {str(step_dir / META_ITEM)!r} is corrupt "
      f"({type(err).__name__}: {err}): move the step folder {str(step_dir)!r} "
      "out of the directory, or restore it from a copy."
    ) from err


def _parse(step_dir: pathlib.Path) -> Snapshot:
  meta = ocp.JsonCheckpointHandler().restore(step_dir / META_ITEM)
  if (
    not isinstance(meta, Mapping)
    or meta.get("format") not in (FORMAT, FORMAT_2)
    or not (step_dir / ITEM).is_dir()
  ):
    raise ValueError(
      f"{str(step_dir)!r} is not an optax_ema.posthoc snapshot (format {FORMAT!r})."
    )
  stored = ocp.PyTreeCheckpointHandler().metadata(step_dir / ITEM).tree
  keys = tuple(meta["keys"])
  specs = [
    jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored[k])
    for k in keys
  ]
  for key, spec in zip(keys[1:], specs[1:], strict=True):
    if _signature(spec) != _signature(specs[0]):
      raise ValueError(
        f"The profiles of {str(step_dir)!r} store different trees ({keys[0]!r} "
        f"and {key!r}): the snapshot is corrupt."
      )
  sigma_rels = np.array(meta["sigma_rels"], np.float64)
  gammas = np.array([_power_math.sigma_rel_to_gamma(float(s)) for s in sigma_rels])
  for array in (sigma_rels, gammas):  # shared by every caller: read-only
    array.flags.writeable = False
  return Snapshot(
    step=int(meta["step"]),
    sigma_rels=sigma_rels,
    gammas=gammas,
    keys=keys,
    dtype=str(meta["dtype"]),
    tree=specs[0],
    path=step_dir,
    run=meta.get("run"),
  )


def _signature(tree: Any) -> dict[Key, tuple[tuple[int, ...], str]]:
  return {
    k: (tuple(v.shape), str(v.dtype)) for k, v in ocp.tree.to_flat_dict(tree).items()
  }


def step_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
  if (directory / META_ITEM).is_dir():
    return [directory]  # one step directory
  committed = ocp.path.step.checkpoint_steps_paths(directory)
  return sorted(
    pathlib.Path(str(p))
    for p in committed
    if (pathlib.Path(str(p)) / META_ITEM).is_dir()
  )


def list_steps(steps: Iterable[int]) -> str:
  """Steps for a message: all of them, or the first and last few."""
  shown = [str(s) for s in steps]
  if len(shown) > 12:
    shown = [*shown[:6], "...", *shown[-5:]]
  return ", ".join(shown)


def _from_directory(directory: PathLike) -> list[Snapshot]:
  path = pathlib.Path(directory)
  wait_for_writers(path)
  wait_for_writers(path.parent)  # ``path`` may be one step of a directory
  if not path.is_dir():
    raise ValueError(f"The snapshot directory {str(path)!r} does not exist.")
  found = [read(p) for p in step_dirs(path)]
  if not found:
    raise ValueError(
      f"The snapshot directory {str(path)!r} holds no snapshots (committed Orbax "
      f"steps with a {ITEM!r} item): save some with posthoc.save_snapshot."
    )
  return found


def load_snapshots(
  directory_or_snapshots: PathLike | Snapshot | Iterable[PathLike | Snapshot],
) -> list[Snapshot]:
  """The snapshots of a directory (or several), reading metadata only.

  Lists the committed steps of the Orbax checkpoint directory that hold a
  snapshot (other steps, and the temporary directories of writes that never
  committed, are skipped), after waiting for this process's pending writes
  to it. No array is read.

  Args:
    directory_or_snapshots: an Orbax checkpoint directory (or one step
      directory of it), a :class:`Snapshot`, or an iterable of those.

  Returns:
    The snapshots sorted by step.

  Raises:
    ValueError: a directory does not exist or holds no snapshot; two
      snapshots have the same step; snapshots store different trees;
      snapshots of several training runs (the message lists each run's
      identity and steps).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   for step in range(1, 7):
    ...     updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...     params = optax.apply_updates(params, updates)
    ...     if step % 2 == 0:
    ...       _ = posthoc.save_snapshot(d, state)  # asynchronous
    ...   print([snap.step for snap in posthoc.load_snapshots(d)])
    [2, 4, 6]
  """
  if isinstance(directory_or_snapshots, (str, os.PathLike)):
    items: list[Any] = [directory_or_snapshots]
  elif isinstance(directory_or_snapshots, Snapshot):
    items = [directory_or_snapshots]
  else:
    items = list(directory_or_snapshots)
  out: list[Snapshot] = []
  for item in items:
    out += [item] if isinstance(item, Snapshot) else _from_directory(item)
  if not out:
    raise ValueError(
      "`directory_or_snapshots` is empty: save snapshots during training first."
    )
  out.sort(key=lambda s: s.step)
  _check_consistent(out)
  return out


def _check_consistent(snaps: list[Snapshot]) -> None:
  first = snaps[0]
  reference = _signature(first.tree)
  for snap in snaps[1:]:
    other = _signature(snap.tree)
    if other == reference:
      continue
    diff = sorted(set(reference) ^ set(other))
    if diff:
      names = ", ".join("/".join(k) for k in diff[:3])
      raise ValueError(
        f"Snapshots store different parameter trees: {str(snap.path)!r} and "
        f"{str(first.path)!r} differ at {names}."
      )
    key = next(k for k in reference if reference[k] != other[k])
    raise ValueError(
      f"Snapshots store different parameter trees: {'/'.join(key)} is "
      f"{other[key]} in {str(snap.path)!r} but {reference[key]} in "
      f"{str(first.path)!r} (shape, dtype)."
    )
  runs: dict[str | None, list[Snapshot]] = {}
  for snap in snaps:
    runs.setdefault(snap.run, []).append(snap)
  if len(runs) > 1:
    listing = "; ".join(
      f"{describe_run(run)} at steps {list_steps(s.step for s in group)} "
      f"(in {_folders(group)})"
      for run, group in runs.items()
    )
    raise ValueError(
      f"The snapshots belong to {len(runs)} training runs: {listing}. "
      "Combining them would average unrelated trajectories: pass the "
      "snapshots of one run, or move each run's step directories to a "
      "directory of its own."
    )
  for prev, snap in itertools.pairwise(snaps):
    if snap.step == prev.step:
      raise ValueError(
        f"Two snapshots have step {snap.step} ({str(prev.path)!r} and "
        f"{str(snap.path)!r}): pass each once."
      )


def describe_run(run: str | None) -> str:
  if run is None:
    return f"a run without identity (format {FORMAT_2!r})"
  return f"run {run}"


def _folders(group: list[Snapshot]) -> str:
  folders = sorted({str(s.path.parent) for s in group})
  return ", ".join(repr(f) for f in folders[:3]) + (", ..." if len(folders) > 3 else "")


def restore_profile(
  checkpointer: Any,
  snap: Snapshot,
  index: int,
  targets: Mapping[Key, Any],
) -> dict[Key, Any]:
  """Restores the leaves ``targets`` names of profile ``index`` of ``snap``.

  ``targets`` maps stored leaf keys (``ocp.tree.to_flat_dict`` keys of
  ``snap.tree``) to their restore arguments (``ocp.ArrayRestoreArgs`` with a
  sharding for ``jax.Array`` results, ``ocp.RestoreArgs(restore_type=
  np.ndarray)`` for NumPy); only those leaves are read.
  """
  flat = ocp.tree.to_flat_dict(snap.tree)
  item = ocp.tree.from_flat_dict(
    {k: v if k in targets else None for k, v in flat.items()}, target=snap.tree
  )
  args = ocp.tree.from_flat_dict({k: targets.get(k) for k in flat}, target=snap.tree)
  key = snap.keys[index]
  restored = checkpointer.restore(
    snap.path / ITEM,
    args=ocp.args.PyTreeRestore(
      item={key: item}, restore_args={key: args}, partial_restore=True
    ),
  )[key]
  return {k: v for k, v in ocp.tree.to_flat_dict(restored).items() if k in targets}
