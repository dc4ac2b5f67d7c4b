"""Saving snapshots during training: asynchronous, atomic Orbax checkpoint steps.

A :class:`SnapshotWriter` owns an ``orbax.checkpoint.CheckpointManager`` on
its directory. Each save casts the profiles where they live, lets Orbax copy
them to the host, and returns while Orbax writes in the background (every
process its own shards) and commits the step by an atomic rename. One writer
per directory and process; reads of that directory in the same process wait
for its pending writes. A writer belongs to one training run: it claims its
directory with a :class:`SnapshotRun` (identity and lock, see ``_run``).
"""

from __future__ import annotations

import atexit
import os
import pathlib
from typing import Any

import numpy as np

from optax_ema import _validation
from optax_ema.posthoc import _items
from optax_ema.posthoc import _run
from optax_ema.posthoc import _snapshots
from optax_ema.posthoc._orbax import ocp


class SnapshotWriter:
  """Saves power-EMA snapshots to an Orbax checkpoint directory, asynchronously.

  Each :meth:`save` writes the profiles of the power-EMA state, cast to
  ``dtype`` where they live (device, or host memory when offloaded), as the
  Orbax checkpoint step ``PowerEmaState.count`` of ``directory``. It returns
  once the arrays are copied to the host; Orbax writes them in the background
  (each process its own shards: it works multi-host, with every process
  calling it) and commits the step atomically, so an interrupted write never
  yields a snapshot that :func:`load_snapshots` would read. Leave the
  ``with`` block, or call :meth:`close` / :meth:`wait_until_finished`, to wait
  for the last write; reads of ``directory`` in this process wait for it too.

  A directory belongs to one training run: every snapshot records the run's
  identity (:attr:`Snapshot.run`), and the writer holds a lock on the
  directory while it is open (see :class:`SnapshotRun`), so a second writer,
  in any process, is refused. A directory that holds snapshots of an earlier
  run is refused too, unless this run continues that one: when training
  resumes from a checkpoint, pass the restored state as ``resume_from``; the
  snapshots newer than its count (written after that checkpoint) are moved
  to a sibling folder, with a warning.

  Args:
    directory: the snapshot directory (created if needed), on a local disk or
      NFS (an object store URL such as ``gs://`` is refused: it cannot be
      locked). It belongs to the writer: temporary directories left there by
      interrupted writes are removed when it opens.
    every: for ``writer(state, step)``: save when ``step % every == 0``.
      ``None`` (default) saves only through :meth:`save`.
    dtype: storage dtype of the averaged leaves (float16 by default, as EDM2).
    resume_from: ``None`` (default) for a new run; to continue the run whose
      snapshots ``directory`` holds, the optimizer state restored from its
      checkpoint (or its ``PowerEmaState.count``), as for
      :class:`SnapshotRun`.

  Attributes:
    run: the :class:`SnapshotRun` (``run.identity`` is the run identity).

  Raises:
    ValueError: bad ``every`` or ``dtype``; another open writer of this
      process already writes to ``directory``; ``directory`` is in use by
      another process, or holds another run's snapshots (pass
      ``resume_from=`` to continue that run).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optax_ema.power_ema(optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   with posthoc.SnapshotWriter(d, every=5) as writer:
    ...     for step in range(1, 11):
    ...       updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    ...       params = optax.apply_updates(params, updates)
    ...       _ = writer(state, step)
    ...   print([s.step for s in posthoc.load_snapshots(d)])
    [5, 10]
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    every: int | None = None,
    *,
    dtype: Any = np.float16,
    resume_from: Any = None,
  ) -> None:
    self.every = _validation.check_every(every)
    self.dtype = _validation.check_snapshot_dtype(dtype)
    self.directory = _run.local_directory(directory)
    self._implicit = False
    self._manager: Any = None
    self.run: _run.SnapshotRun | None = None
    previous = _snapshots.OPEN_WRITERS.get(self.directory)
    if isinstance(previous, SnapshotWriter) and previous._implicit:
      if resume_from is not None:
        raise ValueError(
          f"{str(self.directory)!r} is open in this process through "
          "posthoc.save_snapshot, whose run this writer carries on (nothing "
          "to resume): drop `resume_from`."
        )
      # The process's own run, opened by save_snapshot: carry it on.
      run = previous._release_run()
    elif previous is not None:
      raise ValueError(
        f"{str(self.directory)!r} already has an open SnapshotWriter in this "
        "process: save through it, or close it first."
      )
    else:
      run = _run.SnapshotRun(self.directory, resume_from=resume_from)
    self.run = run
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
      create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except BaseException:
      run.close()
      raise
    self._last = max(self._manager.all_steps(), default=None)
    _snapshots.OPEN_WRITERS[self.directory] = self

  def _release_run(self) -> _run.SnapshotRun:
    """Closes this writer but keeps its run open, for the next writer."""
    run, self.run = self.run, None
    self.close()
    assert run is not None
    return run

  def _save(self, opt_state: Any, dtype: Any, caller: str, stored: Any = None) -> int:
    if self._manager is None or self.run is None:
      raise ValueError(f"This SnapshotWriter of {str(self.directory)!r} is closed.")
    if stored is None:
      stored = _items.storage_tree(opt_state, dtype, caller, self.run.identity)
    step, tree, meta = stored
    if step == 0:
      raise ValueError(
        f"`{caller}` got a power_ema state that has averaged nothing yet (its "
        "count, the updates applied, is 0): save snapshots after updates."
      )
    if self._last is not None and step == self._last:
      raise ValueError(
        f"{str(self.directory)!r} already holds the snapshot of count {step}: "
        "the state has not averaged since. A snapshot is named by the state's "
        "count, the updates the wrapped optimizer applied (not optax.MultiSteps "
        "micro-steps); save after the next update."
      )
    if self._last is not None and step < self._last:
      raise ValueError(
        f"{str(self.directory)!r} already holds a snapshot of count {self._last} "
        f"and cannot take one of count {step} (counts must increase): "
        "snapshots from a run that was resumed from an earlier checkpoint "
        "belong to another trajectory: open the writer with "
        "`resume_from=opt_state` (the restored state), which moves them aside."
      )
    self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          _snapshots.ITEM: ocp.args.PyTreeSave(tree),
          _snapshots.META_ITEM: ocp.args.JsonSave(meta),
        }
      ),
      force=True,
    )
    self._last = step
    return step

  def save(self, opt_state: Any) -> int:
    """Saves a snapshot of the power-EMA state inside ``opt_state`` now.

    Args:
      opt_state: an optimizer state holding one :class:`optax_ema.PowerEmaState`.

    Returns:
      The step saved (``PowerEmaState.count``); it is committed later.

    Raises:
      ValueError: no power-EMA state; a stored average is not finite in the
        storage dtype (e.g. float16 overflow); the step is not after the
        directory's latest snapshot.
    """
    return self._save(opt_state, self.dtype, "SnapshotWriter.save")

  def __call__(self, opt_state: Any, step: int) -> bool:
    """Saves when ``step`` (a Python int) is a multiple of ``every``.

    Returns:
      Whether a snapshot was saved.
    """
    if self.every is None:
      raise ValueError(
        "This SnapshotWriter has `every=None`: create it with `every=N` to call "
        "it as `writer(state, step)`, or call `writer.save(state)`."
      )
    if int(step) % self.every != 0:
      return False
    self.save(opt_state)
    return True

  def wait_until_finished(self) -> None:
    """Waits until every snapshot saved so far is committed."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending writes and releases the directory (its lock)."""
    manager, self._manager = self._manager, None
    if _snapshots.OPEN_WRITERS.get(self.directory) is self:
      del _snapshots.OPEN_WRITERS[self.directory]
    try:
      if manager is not None:
        manager.close()
    finally:
      if self.run is not None:
        self.run.close()

  def __enter__(self) -> SnapshotWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def save_snapshot(
  directory: str | os.PathLike[str],
  opt_state: Any,
  *,
  dtype: Any = np.float16,
  resume_from: Any = None,
) -> pathlib.Path:
  """Saves a snapshot of the power-EMA profiles to ``directory``, asynchronously.

  The function form of :meth:`SnapshotWriter.save`: it uses this process's
  open writer of ``directory``, opening one on first use. It returns before
  the write commits; :func:`wait_until_finished` waits for it, and so do
  :func:`load_snapshots` and :func:`reconstruct` on the same directory (and
  the end of the process). The writer, and with it the directory's lock and
  run identity, stays open until the process exits.

  Args:
    directory: the snapshot directory (created if needed).
    opt_state: an optimizer state holding one :class:`optax_ema.PowerEmaState`.
    dtype: storage dtype of the averaged leaves (float16 by default).
    resume_from: used by the call that opens the directory (the first in this
      process): to continue the run whose snapshots it holds, the optimizer
      state restored from its checkpoint, as for :class:`SnapshotWriter`.

  Returns:
    The Orbax step directory the snapshot is committed to,
    ``directory / str(count)``.

  Raises:
    ValueError: as for :meth:`SnapshotWriter.save`.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> tx = optax_ema.power_ema(optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   path = posthoc.save_snapshot(d, state)
    ...   posthoc.wait_until_finished(d)
    ...   print(path.name, path.is_dir())
    1 True
  """
  path = _run.local_directory(directory)
  writer = _snapshots.OPEN_WRITERS.get(path)
  if isinstance(writer, SnapshotWriter):
    step = writer._save(opt_state, dtype, "save_snapshot")
    return path / str(step)
  # Checks the state before claiming the directory: a refused state leaves
  # nothing behind.
  stored = _items.storage_tree(opt_state, dtype, "save_snapshot", None)
  writer = SnapshotWriter(path, dtype=dtype, resume_from=resume_from)
  writer._implicit = True
  assert writer.run is not None
  stored[2]["run"] = writer.run.identity
  step = writer._save(opt_state, dtype, "save_snapshot", stored)
  return path / str(step)


def wait_until_finished(directory: str | os.PathLike[str] | None = None) -> None:
  """Waits until this process's pending snapshot writes are committed.

  Args:
    directory: wait for the writes to this directory only (default: all).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> tx = optax_ema.power_ema(optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   path = posthoc.save_snapshot(d, state)
    ...   posthoc.wait_until_finished()
    ...   print(*sorted(p.name for p in path.iterdir()))
    _CHECKPOINT_METADATA commit_success.txt power_ema power_ema_meta
  """
  _snapshots.wait_for_writers(None if directory is None else pathlib.Path(directory))


@atexit.register
def _close_all() -> None:
  for writer in list(_snapshots.OPEN_WRITERS.values()):
    if isinstance(writer, SnapshotWriter):
      writer.close()
