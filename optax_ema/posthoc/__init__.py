"""Post-hoc EMA: choose the averaging width after training (Karras et al., EDM2).

Train once with :func:`optax_ema.power_ema` tracking two power-function
profiles (e.g. ``sigma_rel=(0.05, 0.10)``), save their averages every few
thousand steps with :class:`SnapshotWriter` (or :func:`save_snapshot`), and
afterwards synthesize the average of any other profile width with
:func:`reconstruct`, a least-squares fit of the target profile by the stored
ones (EDM2's Algorithm 3). From the command line::

  python -m optax_ema.posthoc --snapshots DIR --sigma-rel 0.07 --out FILE

Snapshot file layout (format ``optax_ema.posthoc/1``): one NumPy ``.npz``
file per snapshot, named ``power_ema-{step:010d}.npz``, holding

- ``format``: the string ``"optax_ema.posthoc/1"``;
- ``step``: int64 scalar, the number of updates the averages cover
  (``PowerEmaState.count``);
- ``sigma_rels``, ``gammas``: float64 vectors, one entry per profile;
- ``paths``: a JSON string, the list of stored leaves in flattening order,
  each ``{"path": [[kind, key], ...], "name": keystr, "averaged": bool}``
  with ``kind`` one of ``"key"`` (dict key), ``"index"`` (sequence index),
  ``"attr"`` (attribute);
- ``avg_{j}_{i}``: the average of profile ``j`` at leaf ``i`` (averaged
  leaves only), in the storage dtype (float16 by default, as EDM2 does);
- ``val_{i}``: the latest value of a non-float leaf ``i``.

Masked-out, ``None`` and PRNG-key leaves are not stored; pass ``like=params``
to :func:`reconstruct` to take them from the current parameters.

References:
  Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving
  the Training Dynamics of Diffusion Models", CVPR 2024 (EDM2), section 3 and
  appendix C.3 (Algorithm 3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_ema import _power_ema as _power
from optax_ema import _power_math
from optax_ema import _reading as _averaged
from optax_ema import _tree_utils

# The profile conversions, public here for post-hoc sweeps.
gamma_to_sigma_rel = _power_math.gamma_to_sigma_rel
sigma_rel_to_gamma = _power_math.sigma_rel_to_gamma
sigma_rel_to_ema_decay = _power_math.sigma_rel_to_ema_decay
SIGMA_REL_MAX = _power_math.SIGMA_REL_MAX

__all__ = [
  "ReconstructionWeights",
  "Snapshot",
  "SnapshotWriter",
  "gamma_to_sigma_rel",
  "load_snapshot",
  "load_snapshots",
  "main",
  "reconstruct",
  "reconstruction_weights",
  "save_snapshot",
  "sigma_rel_to_ema_decay",
  "sigma_rel_to_gamma",
  "snapshot_from_state",
  "snapshot_path",
  "solve_weights",
  "write_snapshot",
]

FORMAT = "optax_ema.posthoc/1"
_PREFIX = "power_ema-"

PathLike = str | os.PathLike


class Snapshot(NamedTuple):
  """One snapshot of the power-EMA profiles, on the host.

  Attributes:
    step: the number of updates the averages cover.
    sigma_rels: float64 vector, the profiles' widths.
    gammas: float64 vector, the profiles' exponents.
    leaves: one dict per stored leaf, ``{"path", "name", "averaged"}`` (see
      the module docstring).
    data: a mapping from the ``avg_{j}_{i}`` / ``val_{i}`` names to arrays
      (an open ``.npz`` file, read lazily, or a dict).
    source: the file it came from, or ``None``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> snap = optax_ema.posthoc.snapshot_from_state(state, dtype=jnp.float32)
    >>> print(snap.step, snap.sigma_rels, [leaf["name"] for leaf in snap.leaves])
    4 [0.05 0.1 ] ["['w']"]
    >>> print([f"{snap.average(j)[0][0]:.4f}" for j in range(2)])
    ['3.9943', '3.8940']
  """

  step: int
  sigma_rels: np.ndarray
  gammas: np.ndarray
  leaves: tuple[dict[str, Any], ...]
  data: Any
  source: str | None = None

  def average(self, j: int) -> list[np.ndarray | None]:
    """The leaves of profile ``j`` (``None`` where a leaf is not averaged)."""
    return [
      np.asarray(self.data[f"avg_{j}_{i}"]) if leaf["averaged"] else None
      for i, leaf in enumerate(self.leaves)
    ]


class ReconstructionWeights(NamedTuple):
  """The least-squares fit of a target profile by stored ones.

  Attributes:
    step: the step the target profile ends at.
    sigma_rel: the target width.
    snapshot_steps: int64 vector, the step of each stored profile used.
    snapshot_sigma_rels: float64 vector, the width of each one.
    coefficients: float64 vector, the weight of each one.
    fit_error: the relative L2 distance between the target profile and the
      fitted combination of profiles, as functions of time
      (``||p - sum_k c_k p_k|| / ||p||``; 0 is exact).

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> snaps = []
    >>> for step in range(1, 11):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   if step % 5 == 0:
    ...     snaps.append(optax_ema.posthoc.snapshot_from_state(state))
    >>> w = optax_ema.posthoc.reconstruction_weights(snaps, sigma_rel=0.10)
    >>> print(w.step, w.snapshot_steps, w.snapshot_sigma_rels)
    10 [ 5  5 10 10] [0.05 0.1  0.05 0.1 ]
    >>> c = w.coefficients  # the tracked profile at the last step, exactly
    >>> print(f"{c[3]:.4f}", bool(np.all(np.abs(c[:3]) < 1e-9)), f"{w.fit_error:.1e}")
    1.0000 True 0.0e+00
  """

  step: int
  sigma_rel: float
  snapshot_steps: np.ndarray
  snapshot_sigma_rels: np.ndarray
  coefficients: np.ndarray
  fit_error: float


# --------------------------------------------------------------------------
# Writing snapshots.


def _encode_path(path: tuple[Any, ...]) -> list[list[Any]]:
  out = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      key = entry.key
      if not isinstance(key, (str, int)):
        key = str(key)
      out.append(["key", key])
    elif isinstance(entry, jax.tree_util.SequenceKey):
      out.append(["index", entry.idx])
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      out.append(["attr", entry.name])
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      out.append(["index", entry.key])
    else:
      out.append(["key", str(entry)])
  return out


def _power_state(opt_state: Any, caller: str) -> _power.PowerEmaState:
  state = _averaged.find_average_state(opt_state, caller)
  if not isinstance(state, _power.PowerEmaState):
    raise ValueError(
      f"`{caller}` needs the state of optax_ema.power_ema, found a "
      f"{type(state).__name__}: wrap the optimizer with power_ema."
    )
  return state


def _check_storage_dtype(dtype: Any) -> np.dtype:
  try:
    out = np.dtype(dtype)
  except TypeError:
    raise TypeError(f"`dtype` must be a floating point dtype, got {dtype!r}.") from None
  if not np.issubdtype(out, np.floating):
    raise ValueError(f"`dtype` must be a floating point dtype, got {out.name}.")
  return out


def snapshot_from_state(opt_state: Any, dtype: Any = np.float16) -> Snapshot:
  """Copies the power-EMA profiles of ``opt_state`` to the host as a Snapshot.

  Float leaves are cast to ``dtype`` on the device first, so the transfer
  moves only the storage bytes; this call returns once the copy is done.

  Args:
    opt_state: an optimizer state holding one :class:`optax_ema.PowerEmaState`.
    dtype: storage dtype of the averages (float16, EDM2's choice, by default).

  Returns:
    A :class:`Snapshot` with NumPy arrays.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.power_ema(optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> snap = optax_ema.posthoc.snapshot_from_state(state)
    >>> print(snap.step, snap.sigma_rels, snap.average(0)[0].dtype)
    0 [0.05 0.1 ] float16
  """
  storage = _check_storage_dtype(dtype)
  state = _power_state(opt_state, "snapshot_from_state")
  keys = [_power.sigma_rel_key(s) for s in _power.tracked_sigma_rels(state)]
  sigmas = np.array([float(k) for k in keys], np.float64)
  flat = [
    jax.tree_util.tree_flatten_with_path(
      state.averages[k], is_leaf=_tree_utils.is_none_or_masked
    )[0]
    for k in keys
  ]
  leaves: list[dict[str, Any]] = []
  device_data: dict[str, Any] = {}
  for i, (path, leaf) in enumerate(flat[0]):
    if _tree_utils.is_none_or_masked(leaf) or _tree_utils.is_key(leaf):
      continue
    n = len(leaves)
    averaged = _tree_utils.is_float(leaf)
    leaves.append(
      {
        "path": _encode_path(path),
        "name": _tree_utils.keystr(path),
        "averaged": averaged,
      }
    )
    if averaged:
      for j in range(len(keys)):
        x = jnp.asarray(flat[j][i][1])
        if not jnp.issubdtype(x.dtype, jnp.complexfloating):
          x = x.astype(storage)
        device_data[f"avg_{j}_{n}"] = x
    else:
      device_data[f"val_{n}"] = leaf
  host_data, count = jax.device_get((device_data, state.count))
  return Snapshot(
    step=int(count),
    sigma_rels=sigmas,
    gammas=np.array([_power_math.sigma_rel_to_gamma(s) for s in sigmas]),
    leaves=tuple(leaves),
    data={k: np.asarray(v) for k, v in host_data.items()},
  )


def snapshot_path(directory: PathLike, step: int) -> pathlib.Path:
  """The file name of the snapshot at ``step`` in ``directory``.

  Args:
    directory: the snapshot directory.
    step: the number of updates the snapshot covers.

  Returns:
    ``directory / "power_ema-{step:010d}.npz"``; the zero padding makes the
    names sort by step.

  Examples:
    >>> from optax_ema import posthoc
    >>> print(posthoc.snapshot_path("ckpt", 1500).as_posix())
    ckpt/power_ema-0000001500.npz
  """
  return pathlib.Path(directory) / f"{_PREFIX}{int(step):010d}.npz"


def write_snapshot(directory: PathLike, snapshot: Snapshot) -> pathlib.Path:
  """Writes a :class:`Snapshot` to ``directory`` (created if needed).

  The file is written under a temporary name and renamed, so a reader never
  sees a partial snapshot.

  Args:
    directory: where to write (created if needed).
    snapshot: the snapshot, e.g. from :func:`snapshot_from_state`.

  Returns:
    The path of the written file, ``snapshot_path(directory, snapshot.step)``.

  Raises:
    ValueError: a stored average is not finite (e.g. it overflows float16:
      save with ``dtype=np.float32``).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    >>> snap = posthoc.snapshot_from_state(state)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   path = posthoc.write_snapshot(d, snap)
    ...   print(path.name, path == posthoc.snapshot_path(d, 1))
    power_ema-0000000001.npz True
  """
  for name, value in snapshot.data.items():
    if name.startswith("avg_") and not np.all(np.isfinite(value)):
      raise ValueError(
        f"The snapshot at step {snapshot.step} holds non-finite values in "
        f"{name} (dtype {value.dtype}); if the parameters exceed the float16 "
        "range, save with `dtype=np.float32`."
      )
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  target = snapshot_path(directory, snapshot.step)
  tmp = target.with_name(target.name + ".tmp.npz")
  np.savez(
    tmp,
    format=np.array(FORMAT),
    step=np.array(snapshot.step, np.int64),
    sigma_rels=np.asarray(snapshot.sigma_rels, np.float64),
    gammas=np.asarray(snapshot.gammas, np.float64),
    paths=np.array(json.dumps(list(snapshot.leaves))),
    **dict(snapshot.data),
  )
  os.replace(tmp, target)
  return target


def save_snapshot(
  directory: PathLike, opt_state: Any, *, dtype: Any = np.float16
) -> pathlib.Path:
  """Copies the power-EMA profiles to the host and writes one snapshot file.

  Blocking version of :class:`SnapshotWriter`: returns after the file is
  written. See the module docstring for the file layout.

  Args:
    directory: where to write (created if needed).
    opt_state: an optimizer state holding one :class:`optax_ema.PowerEmaState`.
    dtype: storage dtype of the averages (float16 by default).

  Returns:
    The path of the written file.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> tx = optax_ema.power_ema(optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> with tempfile.TemporaryDirectory() as d:
    ...   print(optax_ema.posthoc.save_snapshot(d, state).name)
    power_ema-0000000000.npz
  """
  return write_snapshot(directory, snapshot_from_state(opt_state, dtype))


class SnapshotWriter:
  """Saves power-EMA snapshots every ``every`` steps without stalling training.

  Call it from the training loop with the state and the step number. On a
  saving step it copies the profiles to the host (cast to the storage dtype
  on the device first) and hands the file writing to a background thread,
  so the loop waits only for the device-to-host copy. Errors from the
  background thread are raised by the next call, :meth:`wait` or
  :meth:`close`.

  Args:
    directory: where to write the ``power_ema-{step:010d}.npz`` files.
    every: save when ``step % every == 0`` (a positive int).
    dtype: storage dtype of the averages (float16 by default, as EDM2).
    max_pending: the most writes queued before a call waits for one.

  Examples:
    >>> import pathlib
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optax_ema.power_ema(optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   with optax_ema.posthoc.SnapshotWriter(d, every=5) as writer:
    ...     for step in range(1, 11):
    ...       updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    ...       params = optax.apply_updates(params, updates)
    ...       _ = writer(state, step)
    ...   print(sorted(p.name for p in pathlib.Path(d).iterdir()))
    ['power_ema-0000000005.npz', 'power_ema-0000000010.npz']
  """

  def __init__(
    self,
    directory: PathLike,
    every: int,
    *,
    dtype: Any = np.float16,
    max_pending: int = 2,
  ) -> None:
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
      raise ValueError(f"`every` must be a positive int, got {every!r}.")
    if (
      isinstance(max_pending, bool)
      or not isinstance(max_pending, int)
      or max_pending < 1
    ):
      raise ValueError(f"`max_pending` must be a positive int, got {max_pending!r}.")
    self.directory = pathlib.Path(directory)
    self.every = int(every)
    self.dtype = _check_storage_dtype(dtype)
    self.max_pending = max_pending
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: list[concurrent.futures.Future] = []

  def _collect(self, block: bool) -> None:
    while self._pending and (block or self._pending[0].done()):
      self._pending.pop(0).result()  # re-raises a failed write

  def save(self, opt_state: Any) -> concurrent.futures.Future:
    """Saves a snapshot now; returns the future of the file write."""
    self._collect(block=False)
    while len(self._pending) >= self.max_pending:
      self._pending.pop(0).result()
    snapshot = snapshot_from_state(opt_state, self.dtype)
    future = self._pool.submit(write_snapshot, self.directory, snapshot)
    self._pending.append(future)
    return future

  def __call__(self, opt_state: Any, step: int) -> concurrent.futures.Future | None:
    """Saves a snapshot when ``step`` (a Python int) is a multiple of ``every``."""
    if int(step) % self.every == 0:
      return self.save(opt_state)
    self._collect(block=False)
    return None

  def wait(self) -> None:
    """Waits for the queued writes; raises the first error among them."""
    self._collect(block=True)

  def close(self) -> None:
    """Waits for the queued writes and stops the background thread."""
    try:
      self.wait()
    finally:
      self._pool.shutdown(wait=True)

  def __enter__(self) -> SnapshotWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


# --------------------------------------------------------------------------
# Reading snapshots.


def load_snapshot(path: PathLike) -> Snapshot:
  """Opens one snapshot file (the arrays are read lazily).

  Args:
    path: a file written by :func:`write_snapshot` (or :func:`save_snapshot`,
      :class:`SnapshotWriter`).

  Returns:
    A :class:`Snapshot` whose ``data`` is the open ``.npz`` file.

  Raises:
    ValueError: the file cannot be read or is not a snapshot.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   path = posthoc.save_snapshot(d, state, dtype=jnp.float32)
    ...   snap = posthoc.load_snapshot(path)
    ...   print(snap.step, snap.sigma_rels, f"{snap.average(1)[0][0]:.4f}")
    4 [0.05 0.1 ] 3.8940
  """
  path = pathlib.Path(path)
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as err:
    raise ValueError(f"Cannot read snapshot file {str(path)!r}: {err}") from None
  missing = {"format", "step", "sigma_rels", "gammas", "paths"} - set(data.files)
  if missing or str(data["format"]) != FORMAT:
    raise ValueError(
      f"{str(path)!r} is not an optax_ema.posthoc snapshot (format {FORMAT!r}): "
      f"missing {sorted(missing)}."
    )
  return Snapshot(
    step=int(data["step"]),
    sigma_rels=np.asarray(data["sigma_rels"], np.float64),
    gammas=np.asarray(data["gammas"], np.float64),
    leaves=tuple(json.loads(str(data["paths"]))),
    data=data,
    source=str(path),
  )


def load_snapshots(
  snapshots: PathLike | Iterable[PathLike | Snapshot],
) -> list[Snapshot]:
  """Snapshots from a directory, a list of files, or Snapshot objects.

  Args:
    snapshots: a directory of ``power_ema-*.npz`` files, or an iterable of
      file paths and/or :class:`Snapshot` objects.

  Returns:
    The snapshots sorted by step.

  Raises:
    ValueError: there are none, a file is not a snapshot, or two snapshots
      store different leaves (shapes or names).

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
    ...       _ = posthoc.save_snapshot(d, state)
    ...   print([snap.step for snap in posthoc.load_snapshots(d)])
    [2, 4, 6]
  """
  if isinstance(snapshots, (str, os.PathLike)):
    directory = pathlib.Path(snapshots)
    if not directory.is_dir():
      raise ValueError(f"`snapshots` directory {str(directory)!r} does not exist.")
    files = sorted(directory.glob(f"{_PREFIX}*.npz"))
    files = [f for f in files if not f.name.endswith(".tmp.npz")]
    if not files:
      raise ValueError(
        f"`snapshots` directory {str(directory)!r} holds no {_PREFIX}*.npz files."
      )
    items: list[Any] = list(files)
  elif isinstance(snapshots, Snapshot):
    items = [snapshots]
  else:
    items = list(snapshots)
  out = [s if isinstance(s, Snapshot) else load_snapshot(s) for s in items]
  if not out:
    raise ValueError("`snapshots` is empty: save snapshots during training first.")
  out.sort(key=lambda s: s.step)
  _check_same_leaves(out)
  return out


def _describe(s: Snapshot) -> str:
  return s.source if s.source is not None else f"the snapshot at step {s.step}"


def _check_same_leaves(snapshots: Sequence[Snapshot]) -> None:
  first = snapshots[0]
  names = [leaf["name"] for leaf in first.leaves]
  shapes = [_leaf_shape(first, i) for i in range(len(first.leaves))]
  for s in snapshots[1:]:
    other = [leaf["name"] for leaf in s.leaves]
    if other != names:
      diff = sorted(set(names) ^ set(other)) or ["(their order)"]
      raise ValueError(
        f"Snapshots store different parameter trees: {_describe(s)} and "
        f"{_describe(first)} differ at {', '.join(diff[:3])}."
      )
    for i, name in enumerate(names):
      if _leaf_shape(s, i) != shapes[i]:
        raise ValueError(
          f"Snapshots store different parameter trees: {name} has shape "
          f"{_leaf_shape(s, i)} in {_describe(s)} but {shapes[i]} in "
          f"{_describe(first)}."
        )


def _leaf_shape(s: Snapshot, i: int) -> tuple[int, ...]:
  key = f"avg_0_{i}" if s.leaves[i]["averaged"] else f"val_{i}"
  return tuple(np.shape(s.data[key]))


# --------------------------------------------------------------------------
# The least-squares fit (EDM2 Algorithm 3).


def _profile_dot(
  t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray
) -> np.ndarray:
  """Inner products of power-function profiles, broadcasting.

  The profile ending at ``t`` with exponent ``g`` is
  ``(g + 1) tau**g / t**(g + 1)`` on ``[0, t]``; the integral of the product
  of two is ``(g_a + 1)(g_b + 1) / (g_a + g_b + 1)`` times
  ``min(t_a, t_b)**(g_a + g_b + 1) / (t_a**(g_a + 1) t_b**(g_b + 1))``,
  evaluated through logarithms to stay finite for large exponents.
  """
  m = np.minimum(t_a, t_b)
  s = g_a + g_b + 1.0
  log = s * np.log(m) - (g_a + 1.0) * np.log(t_a) - (g_b + 1.0) * np.log(t_b)
  return (g_a + 1.0) * (g_b + 1.0) / s * np.exp(log)


def solve_weights(
  steps: Sequence[float],
  gammas: Sequence[float],
  target_step: float,
  target_gamma: float,
) -> tuple[np.ndarray, float]:
  """Least-squares coefficients that combine stored profiles into a target.

  With :math:`p_k` the power-function profile of exponent :math:`\\gamma_k`
  ending at step :math:`t_k` and :math:`p_r` the target profile, solves
  :math:`A c = b` in the least-squares sense, with
  :math:`A_{kl} = \\langle p_k, p_l \\rangle` and
  :math:`b_k = \\langle p_k, p_r \\rangle` (inner products of functions of
  time, in closed form), so that :math:`\\sum_k c_k p_k` is the closest
  combination to :math:`p_r`.

  Args:
    steps: the end step of each stored profile (> 0, at most ``target_step``).
    gammas: the exponent of each stored profile.
    target_step: the end step of the target profile.
    target_gamma: the exponent of the target profile.

  Returns:
    ``(coefficients, fit_error)``: float64 coefficients, one per stored
    profile, and the relative L2 error
    :math:`\\|p_r - \\sum_k c_k p_k\\| / \\|p_r\\|`.

  Examples:
    >>> from optax_ema import posthoc
    >>> c, err = posthoc.solve_weights([100, 100], [6.94, 16.97], 100, 6.94)
    >>> print([f"{x:.3f}" for x in c], f"{err:.1e}")
    ['1.000', '0.000'] 0.0e+00

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, appendix C.3, Algorithm 3.
  """
  t = np.asarray(steps, np.float64) / float(target_step)
  g = np.asarray(gammas, np.float64)
  gr = float(target_gamma)
  a = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
  b = _profile_dot(t, g, np.float64(1.0), np.float64(gr))
  coefficients = np.linalg.lstsq(a, b, rcond=None)[0]
  target_norm2 = (gr + 1.0) ** 2 / (2.0 * gr + 1.0)
  residual2 = target_norm2 - 2.0 * coefficients @ b + coefficients @ a @ coefficients
  fit_error = math.sqrt(max(residual2, 0.0) / target_norm2)
  return coefficients, fit_error


def reconstruction_weights(
  snapshots: PathLike | Iterable[PathLike | Snapshot],
  sigma_rel: float,
  step: int | None = None,
) -> ReconstructionWeights:
  """The coefficients :func:`reconstruct` gives each stored profile.

  Uses every profile of every snapshot taken at or before ``step``.

  Args:
    snapshots: as for :func:`load_snapshots`.
    sigma_rel: the target width, in ``(0, 0.30028]``.
    step: the step the target average ends at (default: the last snapshot's).

  Returns:
    A :class:`ReconstructionWeights`.

  Raises:
    ValueError: no snapshots; fewer than two distinct tracked ``sigma_rel``;
      ``sigma_rel`` outside the solvable range; ``step`` before the first
      snapshot or after the last; mismatched snapshot trees.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> snaps = []
    >>> for step in range(1, 41):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   if step % 20 == 0:
    ...     snaps.append(posthoc.snapshot_from_state(state))
    >>> w = posthoc.reconstruction_weights(snaps, sigma_rel=0.07)
    >>> print(w.step, w.snapshot_steps, w.snapshot_sigma_rels)
    40 [20 20 40 40] [0.05 0.1  0.05 0.1 ]
    >>> print([f"{c:.3f}" for c in w.coefficients], f"{w.fit_error:.1e}")
    ['0.000', '-0.002', '0.454', '0.582'] 4.4e-02
  """
  snaps = load_snapshots(snapshots)
  return _weights(snaps, sigma_rel, step)


def _weights(snaps: list[Snapshot], sigma_rel: Any, step: Any) -> ReconstructionWeights:
  if isinstance(sigma_rel, bool) or not isinstance(
    sigma_rel, (int, float, np.floating)
  ):
    raise TypeError(f"`sigma_rel` must be a float, got {sigma_rel!r}.")
  sigma_rel = float(sigma_rel)
  if math.isnan(sigma_rel) or not 0.0 < sigma_rel <= _power_math.SIGMA_REL_MAX:
    raise ValueError(
      f"`sigma_rel` must be in (0, {_power_math.SIGMA_REL_MAX:.6f}] (the widest "
      f"power-function profile), got {sigma_rel!r}."
    )
  tracked = sorted({float(s) for snap in snaps for s in snap.sigma_rels})
  if len(tracked) < 2:
    raise ValueError(
      "Post-hoc reconstruction needs snapshots of at least two profiles "
      f"(sigma_rel values), got only {tracked}: train with e.g. "
      "`power_ema(opt, sigma_rels=(0.05, 0.10))`."
    )
  first, last = snaps[0].step, snaps[-1].step
  if step is None:
    step = last
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"`step` must be None or an int, got {step!r}.")
  step = int(step)
  if not first <= step <= last or step <= 0:
    raise ValueError(
      f"`step` must be between the first and the last snapshot ({first} and "
      f"{last}) and > 0, got {step}."
    )
  used = [s for s in snaps if 0 < s.step <= step]
  steps = np.array([s.step for s in used for _ in s.sigma_rels], np.int64)
  sigmas = np.concatenate([s.sigma_rels for s in used])
  gammas = np.concatenate([s.gammas for s in used])
  target_gamma = _power_math.sigma_rel_to_gamma(sigma_rel)
  coefficients, fit_error = solve_weights(steps, gammas, step, target_gamma)
  return ReconstructionWeights(step, sigma_rel, steps, sigmas, coefficients, fit_error)


def _build_tree(leaves: Sequence[dict[str, Any]], values: Sequence[Any]) -> Any:
  """Nested dicts (keys, attributes) and lists (indices) from stored paths."""
  root: Any = None
  for leaf, value in zip(leaves, values, strict=True):
    path = leaf["path"]
    if not path:
      return value
    if root is None:
      root = [] if path[0][0] == "index" else {}
    node = root
    for depth, (_kind, key) in enumerate(path):
      is_last = depth == len(path) - 1
      child_default: Any = (
        value if is_last else ([] if path[depth + 1][0] == "index" else {})
      )
      if isinstance(node, list):
        while len(node) <= key:
          node.append(None)
        if is_last:
          node[key] = value
        elif node[key] is None:
          node[key] = child_default
        node = node[key]
      else:
        if is_last:
          node[key] = value
        node = node.setdefault(key, child_default)
  return root


def reconstruct(
  snapshots: PathLike | Iterable[PathLike | Snapshot],
  sigma_rel: float,
  step: int | None = None,
  *,
  like: Any = None,
  dtype: Any = np.float32,
) -> Any:
  """Synthesizes the power-EMA average of any width from saved snapshots.

  Finds the coefficients :math:`c_k` that best express the target profile
  (width ``sigma_rel``, ending at ``step``) as a combination of the stored
  profiles (:func:`solve_weights`, EDM2's Algorithm 3) and returns
  :math:`\\sum_k c_k \\hat{x}_k`, accumulated in float64 on the host.
  Reconstructing a tracked ``sigma_rel`` at a snapshot step returns that
  profile's stored average; widths between the tracked ones are
  interpolated, wider or narrower ones extrapolated less accurately (check
  ``reconstruction_weights(...).fit_error``).

  Args:
    snapshots: a directory of snapshot files, a list of files, or
      :class:`Snapshot` objects.
    sigma_rel: the target width, in ``(0, 0.30028]``.
    step: the step the target average ends at (default: the last snapshot).
    like: optional parameters tree. When given, the result has its structure
      and dtypes, and leaves the snapshots do not store (masked out, ``None``,
      PRNG keys) come from it.
    dtype: the dtype of averaged leaves when ``like`` is not given.

  Returns:
    The synthesized parameters: a pytree like ``like``, or else nested dicts
    and lists rebuilt from the stored paths, holding NumPy arrays.

  Raises:
    ValueError: see :func:`reconstruction_weights`; ``like`` with another
      structure or other shapes than the snapshots.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(0.01), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> snaps = []
    >>> for step in range(1, 101):
    ...   updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   if step % 20 == 0:
    ...     snaps.append(posthoc.snapshot_from_state(state, dtype=jnp.float32))
    >>> avg = posthoc.reconstruct(snaps, sigma_rel=0.10, like=params)
    >>> direct = optax_ema.averaged_params(state, params, which=0.10)
    >>> print(f"{avg['w'][0]:.4f} {direct['w'][0]:.4f}")
    0.8930 0.8930

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, section 3.2 and appendix C.3.
  """
  snaps = load_snapshots(snapshots)
  weights = _weights(snaps, sigma_rel, step)
  out_dtype = _check_storage_dtype(dtype)
  leaves = snaps[0].leaves
  acc: list[Any] = [None] * len(leaves)
  row = 0
  latest = None
  for snap in snaps:
    if not 0 < snap.step <= weights.step:
      continue
    latest = snap
    for j in range(len(snap.sigma_rels)):
      c = weights.coefficients[row]
      row += 1
      for i, value in enumerate(snap.average(j)):
        if value is None:
          continue
        term = c * value.astype(np.complex128 if np.iscomplexobj(value) else np.float64)
        acc[i] = term if acc[i] is None else acc[i] + term
  assert latest is not None
  values = []
  for i, leaf in enumerate(leaves):
    if leaf["averaged"]:
      values.append(acc[i] if np.iscomplexobj(acc[i]) else acc[i].astype(out_dtype))
    else:
      values.append(np.asarray(latest.data[f"val_{i}"]))
  if like is None:
    return _build_tree(leaves, values)
  return _fill_like(like, leaves, values)


def _fill_like(
  like: Any, leaves: Sequence[dict[str, Any]], values: Sequence[Any]
) -> Any:
  by_name = {leaf["name"]: v for leaf, v in zip(leaves, values, strict=True)}
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    like, is_leaf=_tree_utils.is_none
  )
  names = {_tree_utils.keystr(path) for path, _ in flat}
  extra = sorted(set(by_name) - names)
  if extra:
    raise ValueError(
      f"`like` does not have the structure of the snapshots: {', '.join(extra[:3])} "
      "is stored in the snapshots but missing from `like`."
    )
  out = []
  for path, p in flat:
    name = _tree_utils.keystr(path)
    if name not in by_name or p is None:
      out.append(p)
      continue
    v = by_name[name]
    if tuple(np.shape(p)) != tuple(np.shape(v)):
      raise ValueError(
        f"`like` does not have the shapes of the snapshots: {name} has shape "
        f"{tuple(np.shape(p))}, the snapshots {tuple(np.shape(v))}."
      )
    out.append(
      np.asarray(v).astype(np.asarray(p).dtype) if _tree_utils.is_float(p) else v
    )
  return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------
# Command line.


def _flat_named(tree: Any) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_tree_utils.keystr(path): np.asarray(v) for path, v in flat}


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: ``python -m optax_ema.posthoc --snapshots DIR ...``.

  Prints the coefficient of every stored profile and the fit error, and
  writes the synthesized parameters to ``--out`` as an ``.npz`` file with
  one entry per leaf, named by its path (e.g. ``['layer']['w']``), plus
  ``__step__`` and ``__sigma_rel__``.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``): ``--snapshots DIR``,
      ``--sigma-rel FLOAT``, ``--out FILE`` and optionally ``--step INT``
      (default: the last snapshot's step).

  Returns:
    The exit status (0 on success, 2 on bad input).

  Examples:
    >>> import pathlib
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   for step in range(1, 41):
    ...     updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...     params = optax.apply_updates(params, updates)
    ...     if step % 20 == 0:
    ...       _ = posthoc.save_snapshot(d, state)
    ...   out = pathlib.Path(d) / "ema.npz"
    ...   status = posthoc.main(
    ...     ["--snapshots", d, "--sigma-rel", "0.07", "--out", str(out)]
    ...   )
    ...   with np.load(out) as f:
    ...     print(status, f["__step__"], f"{f['__sigma_rel__']:.2f}")
    target: sigma_rel=0.07 at step 40
            step  sigma_rel     coefficient
              20     0.0500    9.18...e-05
              20     0.1000   -2.25...e-03
              40     0.0500    4.54...e-01
              40     0.1000    5.82...e-01
    fit error (relative L2 of the profile): 4.395e-02
    wrote 1 arrays to ...ema.npz
    0 40 0.07
  """
  parser = argparse.ArgumentParser(
    prog="python -m optax_ema.posthoc",
    description="Synthesize a power-function EMA of any width from snapshots "
    "(Karras et al., EDM2, Algorithm 3).",
  )
  parser.add_argument("--snapshots", required=True, help="directory of snapshots")
  parser.add_argument("--sigma-rel", required=True, type=float, help="target width")
  parser.add_argument("--out", required=True, help="output .npz file")
  parser.add_argument(
    "--step", type=int, default=None, help="target step (default: last)"
  )
  args = parser.parse_args(argv)
  try:
    snaps = load_snapshots(args.snapshots)
    weights = _weights(snaps, args.sigma_rel, args.step)
    params = reconstruct(snaps, args.sigma_rel, args.step)
  except (ValueError, TypeError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"target: sigma_rel={weights.sigma_rel:g} at step {weights.step}")
  print(f"{'step':>12}  {'sigma_rel':>9}  {'coefficient':>14}")
  for t, s, c in zip(
    weights.snapshot_steps,
    weights.snapshot_sigma_rels,
    weights.coefficients,
    strict=True,
  ):
    print(f"{int(t):>12d}  {s:>9.4f}  {c:>14.6e}")
  print(f"fit error (relative L2 of the profile): {weights.fit_error:.3e}")
  named = _flat_named(params)
  out = args.out if str(args.out).endswith(".npz") else f"{args.out}.npz"
  np.savez(
    out,
    __step__=np.array(weights.step, np.int64),
    __sigma_rel__=np.array(weights.sigma_rel),
    **named,
  )
  print(f"wrote {len(named)} arrays to {out}")
  return 0
