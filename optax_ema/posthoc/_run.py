"""One training run per snapshot directory: its identity and its lock.

Every snapshot records the identity of the training run that wrote it (a
``uuid4`` hex), so that :func:`load_snapshots` can refuse to combine two runs.
A :class:`SnapshotRun` claims a directory for one run:

- **Identity**: process 0 decides it (a new one for an empty directory, the
  directory's own when told to continue it) and
  ``jax.experimental.multihost_utils.broadcast_one_to_all`` gives it, or
  process 0's refusal, to every process of a multi-host run.
- **Lock**: process 0 holds an exclusive ``flock`` on
  ``DIR/.optax_ema.posthoc.lock`` while the run is open; a second run on the
  directory, in any process, is refused. The operating system releases the
  lock when the process exits or is killed. Local filesystems and NFS (where
  Linux maps ``flock`` to NFS byte-range locks) support it; an object store
  URL (``gs://``, ``s3://``) cannot hold one and is refused.
- **Continuing**: a directory holding snapshots belongs to the run that
  wrote them. A new run is refused there unless told explicitly to continue
  it (``resume_from=``, the optimizer state restored from that run's
  checkpoint): it then adopts the directory's identity and moves every step
  folder newer than the restored count (an abandoned trajectory: snapshots,
  and the plain checkpoints of a ``CheckpointManager`` sharing the
  directory, which would otherwise skip saving those steps again) into the
  sibling folder ``DIR.abandoned-after-COUNT`` (never deleted), with a
  warning that names their steps.
- **Not inside a snapshot**: a directory that is a snapshot's step folder,
  or lies inside one, is refused (nothing would read snapshots there).
"""

from __future__ import annotations

import os
import pathlib
import socket
import uuid
from typing import Any

import jax
import numpy as np

from optax_ema import _validation
from optax_ema import _warn
from optax_ema.posthoc import _snapshots
from optax_ema.posthoc import _state
from optax_ema.posthoc._orbax import ocp

LOCK_NAME = ".optax_ema.posthoc.lock"
_MESSAGE_BYTES = 4096
_ID_BYTES = 16


def local_directory(directory: Any, argument: str = "directory") -> pathlib.Path:
  """``directory`` checked (a path, not a URL: it takes a lock) and resolved."""
  return pathlib.Path(_validation.check_directory(directory, argument)).resolve()


def resume_count(resume_from: Any, caller: str) -> int | None:
  """The count a run resumes from: an int, or the count of a power-EMA state."""
  return _validation.check_resume_from(
    resume_from,
    lambda state: _state.PowerEmaLayout.count(_state.find_power_state(state, caller)),
  )


describe = _snapshots.describe_run  # how a message names a run


def _holder() -> str:
  return f"process {os.getpid()} on {socket.gethostname()}"


def _lock(directory: pathlib.Path) -> int:
  import fcntl  # POSIX only: imported when a directory is claimed

  directory.mkdir(parents=True, exist_ok=True)
  path = directory / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    if holder == _holder():
      raise ValueError(
        f"{str(directory)!r} is in use by another snapshot writer of this "
        f"process ({holder} holds its lock {LOCK_NAME}): a SnapshotRun or "
        "SnapshotWriter on it is still open. Close it first (or use it), or "
        "give this run a directory of its own."
      ) from None
    raise ValueError(
      f"{str(directory)!r} is in use by another snapshot writer ({holder} holds "
      f"its lock {LOCK_NAME}): two runs writing one directory would replace "
      "each other's snapshots. Give this run a directory of its own, or stop "
      "the other writer first (its lock is released when it closes or exits)."
    ) from None
  except OSError as err:
    os.close(fd)
    raise ValueError(
      f"{str(directory)!r} cannot be locked ({err.strerror}): snapshot "
      "directories must be on a filesystem with locks (a local disk or NFS)."
    ) from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{_holder()}\n".encode(), 0)
  return fd


def _unlock(fd: int) -> None:
  import fcntl

  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


def runs_of(snaps: list[_snapshots.Snapshot]) -> dict[str | None, list[int]]:
  """The steps of each run among ``snaps``, in order of first appearance."""
  runs: dict[str | None, list[int]] = {}
  for snap in snaps:
    runs.setdefault(snap.run, []).append(snap.step)
  return runs


def list_runs(runs: dict[str | None, list[int]]) -> str:
  return "; ".join(
    f"{describe(r)} at steps {_snapshots.list_steps(s)}" for r, s in runs.items()
  )


def _sibling(directory: pathlib.Path, count: int) -> pathlib.Path:
  base = directory.parent / f"{directory.name}.abandoned-after-{count}"
  target, n = base, 1
  while target.exists():
    n += 1
    target = base.with_name(f"{base.name}.{n}")
  return target


def _check_not_a_step(directory: pathlib.Path) -> None:
  """Refuses a directory that is a snapshot's step folder or inside one."""
  for folder in [directory, *directory.parents]:
    if (folder / _snapshots.META_ITEM).is_dir():
      raise ValueError(
        f"`directory` {str(directory)!r} is the snapshot step folder "
        f"{str(folder)!r} or inside it: snapshots written there would nest "
        "inside another snapshot, where nothing reads them. Pass the "
        f"snapshot directory itself, {str(folder.parent)!r}, or a new directory."
      )


_TMP_MARK = ".orbax-checkpoint-tmp"


def _newer_step_folders(
  directory: pathlib.Path, count: int
) -> list[tuple[int, pathlib.Path]]:
  """Every step folder of ``directory`` after ``count``, snapshot or not.

  Orbax's step names (``150``, ``step_150``): a ``CheckpointManager``
  sharing the directory skips saving any step up to the latest it finds
  there. An unfinished write (``150.orbax-checkpoint-tmp-...``) is no step:
  Orbax never reads it and the next writer removes it.
  """
  out = []
  for path in directory.iterdir():
    if not path.is_dir() or _TMP_MARK in path.name:
      continue
    try:
      step = ocp.path.step.step_from_checkpoint_name(path.name)
    except ValueError:
      continue
    if step > count:
      out.append((step, path))
  return sorted(out)


def _move_newer(directory: pathlib.Path, count: int, who: str) -> None:
  """Moves the step folders after ``count`` aside, with a warning naming them."""
  newer = _newer_step_folders(directory, count)
  if not newer:
    return
  snapshot_steps = [s for s, p in newer if (p / _snapshots.META_ITEM).is_dir()]
  other_steps = [s for s, p in newer if not (p / _snapshots.META_ITEM).is_dir()]
  target = _sibling(directory, count)
  target.mkdir(parents=True)
  for _, path in newer:
    path.rename(target / path.name)
  what = []
  if snapshot_steps:
    what.append(f"its snapshots of steps {_snapshots.list_steps(snapshot_steps)}")
  if other_steps:
    what.append(
      "the other step folders (checkpoints) of steps "
      + _snapshots.list_steps(other_steps)
    )
  _warn.warn(
    f"Continuing {who} in {str(directory)!r} from count {count}: "
    f"moved {' and '.join(what)}, newer than the restored state (an abandoned "
    f"trajectory), to {str(target)!r}. Open a CheckpointManager on the "
    "directory after this, so that it sees them gone."
  )


def _decide(directory: pathlib.Path, count: int | None) -> str | None:
  """Process 0: the run identity for ``directory``, or ValueError."""
  snaps = [_snapshots.read(p) for p in _snapshots.step_dirs(directory)]
  snaps.sort(key=lambda s: s.step)  # the folders sort as strings
  if not snaps:
    if count is not None:
      _move_newer(directory, count, "this run")
    return uuid.uuid4().hex
  runs = runs_of(snaps)
  if len(runs) > 1:
    raise ValueError(
      f"{str(directory)!r} holds the snapshots of {len(runs)} training runs "
      f"({list_runs(runs)}): move the step directories of all runs but one to "
      "directories of their own before writing to it."
    )
  ((run, steps),) = runs.items()
  if count is None:
    raise ValueError(
      f"{str(directory)!r} holds the snapshots of another training run "
      f"({describe(run)}, steps {_snapshots.list_steps(steps)}): a new run "
      "would mix its snapshots with them. Give this run a new directory; or, "
      "if this run continues that one from its checkpoint, pass "
      "`resume_from=opt_state` (the restored optimizer state) to continue it."
    )
  _move_newer(directory, count, describe(run))
  return run


def _broadcast(ok: bool, run: str | None, message: str) -> tuple[bool, str | None, str]:
  """Process 0's decision, in every process."""
  buf = np.zeros(2 + _ID_BYTES + _MESSAGE_BYTES, np.uint8)
  if jax.process_index() == 0:
    buf[0] = ok
    if run is not None:
      buf[1] = 1
      buf[2 : 2 + _ID_BYTES] = np.frombuffer(bytes.fromhex(run), np.uint8)
    encoded = message.encode()[:_MESSAGE_BYTES]
    buf[2 + _ID_BYTES : 2 + _ID_BYTES + len(encoded)] = np.frombuffer(encoded, np.uint8)
  from jax.experimental import multihost_utils

  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  run = bytes(buf[2 : 2 + _ID_BYTES]).hex() if buf[1] else None
  text = bytes(buf[2 + _ID_BYTES :]).rstrip(b"\0").decode(errors="replace")
  return bool(buf[0]), run, text


class SnapshotRun:
  """Claims a snapshot directory for one training run: its identity and lock.

  :class:`SnapshotWriter` opens one for its directory; open one yourself to
  write snapshots with your own ``orbax.checkpoint.CheckpointManager``
  (:func:`snapshot_items`). Every process of a multi-host run opens it
  together (process 0 decides, and holds the lock). A directory holding
  snapshots belongs to the run that wrote them: a new run is refused there,
  unless ``resume_from`` says that this run continues that one.

  Args:
    directory: the snapshot directory (created if needed), on a local disk or
      NFS: it is locked while the run is open (an object store URL such as
      ``gs://`` cannot be locked and is refused).
    resume_from: ``None`` (default) for a new run; to continue the run whose
      snapshots ``directory`` holds, the optimizer state restored from its
      checkpoint (or that state's ``PowerEmaState.count``, an integer or an
      integer array). The run adopts the directory's identity, and every
      step folder newer than the restored count (snapshots and the plain
      checkpoints of your ``CheckpointManager``) is moved to the sibling
      folder ``DIR.abandoned-after-COUNT`` (with a UserWarning naming their
      steps): open your manager after this.

  Attributes:
    directory: the resolved directory.
    identity: the run identity recorded in each snapshot (a 32-digit hex
      string; ``None`` when continuing a directory of format
      ``optax_ema.posthoc/2``, whose snapshots carry none).

  Raises:
    ValueError: ``directory`` holds another run's snapshots (and no
      ``resume_from``), or snapshots of several runs; another open run holds
      its lock (in this or another process); it is a snapshot's step folder
      or inside one; it is a URL or cannot be locked.

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
    ...   with posthoc.SnapshotWriter(d) as writer:
    ...     _ = writer.save(state)
    ...   (snap,) = posthoc.load_snapshots(d)
    ...   try:
    ...     posthoc.SnapshotRun(d)  # a new run in a directory in use
    ...   except ValueError as err:
    ...     print("refused:", "another training run" in str(err))
    ...   with posthoc.SnapshotRun(d, resume_from=state) as run:
    ...     print(run.identity == snap.run == writer.run.identity)
    refused: True
    True
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    *,
    resume_from: Any = None,
  ) -> None:
    self.directory = local_directory(directory)
    count = resume_count(resume_from, "SnapshotRun")
    self._fd: int | None = None
    ok, run, message = True, None, ""
    if jax.process_index() == 0:
      try:
        _check_not_a_step(self.directory)
        self._fd = _lock(self.directory)
        run = _decide(self.directory, count)
      except Exception as err:  # any failure: the others wait for it
        ok, message = False, str(err)
        if not isinstance(err, (ValueError, OSError)):
          message = f"{type(err).__name__}: {message}"
        self.close()
    ok, run, message = _broadcast(ok, run, message)
    if not ok:
      raise ValueError(message)
    self.identity: str | None = run
    self.closed = False

  def close(self) -> None:
    """Releases the directory's lock (held by process 0)."""
    self.closed = True
    fd, self._fd = self._fd, None
    if fd is not None:
      _unlock(fd)

  def __enter__(self) -> SnapshotRun:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"SnapshotRun({str(self.directory)!r}, identity={self.identity!r})"
