"""A sweep of widths: reconstruct each one, evaluate it, one row per width.

The snapshots' metadata is read once; their arrays are read once per width.
Reading them once for all widths would need one float32 accumulator per
width alive together (``len(sigma_rels)`` times the model, e.g. 17 widths of
a 1B-parameter model: 68 GB), while one width at a time holds one
accumulator, as :func:`~optax_ema.posthoc.reconstruct` does, and the
parameters ``evaluate`` needs are a model anyway. The price is I/O: every
width reads the snapshots it uses again (the operating system's page cache
serves the repeats when they fit in memory).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

from optax_ema import _validation
from optax_ema import _warn
from optax_ema.posthoc import _reconstruct
from optax_ema.posthoc import _snapshots
from optax_ema.posthoc import _solver

# The per-width warning of a poor fit, replaced by one for the whole sweep.
_FIT_WARNING = re.compile(r"fit.?error", re.IGNORECASE)


class SweepRow(NamedTuple):
  """One width of a :func:`sweep`.

  Attributes:
    sigma_rel: the reconstructed width.
    step: the step the reconstructed average ends at.
    fit_error: how far the combination of stored profiles is from the
      target profile (see :class:`ReconstructionWeights`).
    value: what ``evaluate`` returned, as a float, or a tuple or dict of
      floats.

  Examples:
    >>> from optax_ema import posthoc
    >>> row = posthoc.SweepRow(0.07, 1000, 0.002, {"loss": 0.12})
    >>> print(row.sigma_rel, row.step, row.value["loss"])
    0.07 1000 0.12
  """

  sigma_rel: float
  step: int
  fit_error: float
  value: Any


def _as_floats(value: Any) -> Any:
  """``evaluate``'s result as a float, a tuple or a dict of floats."""
  try:
    if isinstance(value, Mapping):
      return {k: _scalar(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
      return tuple(_scalar(v) for v in value)
    return _scalar(value)
  except (TypeError, ValueError):
    raise TypeError(
      "`evaluate` must return a number (e.g. a scalar jax.Array), or a tuple "
      f"or dict of numbers, got {value!r}."
    ) from None


def _scalar(v: Any) -> float:
  if np.ndim(v) != 0:
    raise TypeError(f"not a scalar: shape {np.shape(v)}")
  return float(v)


def sweep(
  directory: str | os.PathLike[str] | Iterable[Any],
  sigma_rels: Iterable[float],
  evaluate: Callable[[Any], Any],
  *,
  step: int | None = None,
  like: Any = None,
) -> list[SweepRow]:
  """Reconstructs each width from the snapshots and evaluates it.

  For each ``sigma_rel`` in order: :func:`reconstruct` the average of that
  width ending at ``step``, call ``evaluate`` on it once, and keep a
  :class:`SweepRow`. The snapshots' metadata is read once; their arrays once
  per width, so memory holds one reconstruction at a time (reading them
  once for all widths would hold one float32 copy of the model per width).

  Widths whose ``fit_error`` exceeds 0.1 (typically far outside the tracked
  widths, or early steps with few snapshots) give one ``UserWarning`` for the
  whole sweep that lists them; their rows are still returned.

  Args:
    directory: the snapshots, as for :func:`load_snapshots`.
    sigma_rels: the widths to reconstruct, each in ``(0, 0.30028]``.
    evaluate: called with each reconstructed parameter tree; returns a number
      (e.g. a scalar ``jax.Array``) or a tuple or dict of numbers.
    step: the step the averages end at, a snapshot step (default: the last).
    like: as for :func:`reconstruct`: the target structure, dtypes and
      shardings of the parameters ``evaluate`` receives (default: NumPy
      arrays in the stored structure).

  Returns:
    One :class:`SweepRow` per width, in the order of ``sigma_rels``.

  Raises:
    ValueError: as :func:`reconstruct`, for the first width that fails.
    TypeError: ``evaluate`` returned something else than numbers.

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
    ...   with posthoc.SnapshotWriter(d, every=20) as writer:
    ...     for step in range(1, 101):
    ...       grads = {"w": -jnp.ones(2)}
    ...       updates, state = tx.update(grads, state, params)
    ...       params = optax.apply_updates(params, updates)
    ...       _ = writer(state, step)
    ...   rows = posthoc.sweep(
    ...     d, [0.05, 0.07, 0.10], lambda p: p["w"][0], like=params
    ...   )
    >>> for r in rows:
    ...   print(f"{r.sigma_rel} {r.step} {r.fit_error:.3f} {r.value:.3f}")
    0.05 100 0.000 0.952
    0.07 100 0.028 0.928
    0.1 100 0.000 0.893
  """
  widths = _validation.check_sweep_widths(sigma_rels)
  _validation.check_evaluate(evaluate)
  snaps = _snapshots.load_snapshots(directory)
  rows = []
  for sigma_rel in widths:
    # The per-width fit warning (of the solver or of reconstruct) is folded
    # into one for the sweep; any other warning goes on.
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      weights = _solver.select_weights(snaps, sigma_rel, step)
      params = _reconstruct.reconstruct(snaps, sigma_rel, weights.step, like=like)
    for w in caught:
      if not (
        issubclass(w.category, UserWarning) and _FIT_WARNING.search(str(w.message))
      ):
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    value = _as_floats(evaluate(params))
    del params
    rows.append(SweepRow(sigma_rel, weights.step, float(weights.fit_error), value))
  poor = [r for r in rows if r.fit_error > _solver.FIT_ERROR_WARNING]
  if poor:
    listed = ", ".join(f"{r.sigma_rel:g} ({r.fit_error:.2f})" for r in poor)
    _warn.warn(
      f"{len(poor)} of {len(rows)} widths are reconstructed with a fit_error "
      f"above {_solver.FIT_ERROR_WARNING}: {listed}. Their values stand for "
      "a profile other than the one asked for; track widths closer to them "
      "or save snapshots more often."
    )
  return rows


def _values(rows: Sequence[SweepRow], key: Any) -> tuple[np.ndarray, str]:
  first = rows[0].value
  key = _validation.check_sweep_key(first, key)
  if isinstance(first, (Mapping, tuple)):
    label = str(key) if isinstance(first, Mapping) else f"value[{key}]"
    return np.array([float(r.value[key]) for r in rows]), label
  return np.array([float(r.value) for r in rows]), "value"


def _tracked(tracked: Any) -> list[float]:
  if tracked is None:
    return []
  if isinstance(tracked, (str, os.PathLike)):
    snaps = _snapshots.load_snapshots(tracked)
    return sorted({float(s) for snap in snaps for s in snap.sigma_rels})
  return sorted({float(s) for s in tracked})


def plot_sweep(
  rows: Sequence[SweepRow],
  *,
  tracked: str | os.PathLike[str] | Iterable[float] | None = None,
  key: Any = None,
  ax: Any = None,
) -> Any:
  """Draws a :func:`sweep`'s values against ``sigma_rel`` (log axis).

  Widths with a ``fit_error`` above 0.1 are drawn as hollow markers, the
  tracked widths as dotted vertical lines. Needs matplotlib (the ``demo``
  extra); draws on a new ``matplotlib.figure.Figure`` unless ``ax`` is given,
  and never calls ``plt.show()``: save the figure, or let a notebook show it.

  Args:
    rows: the rows of :func:`sweep`.
    tracked: the tracked widths to mark: a snapshot directory to read them
      from, or the widths themselves.
    key: which value to draw when ``evaluate`` returned a dict (its key) or a
      tuple (an index).
    ax: a matplotlib ``Axes`` to draw on (default: a new figure's).

  Returns:
    The ``matplotlib.figure.Figure`` drawn on.

  Raises:
    ImportError: matplotlib is not installed.
    ValueError: no rows; several values per row and no ``key``.

  Examples:
    >>> from optax_ema import posthoc
    >>> rows = [
    ...   posthoc.SweepRow(s, 1000, e, {"loss": v})
    ...   for s, e, v in [(0.02, 0.2, 0.3), (0.07, 0, 0.2), (0.2, 0, 0.25)]
    ... ]
    >>> fig = posthoc.plot_sweep(rows, tracked=(0.05, 0.10), key="loss")
    >>> ax = fig.axes[0]
    >>> print(ax.get_xscale(), ax.get_ylabel(), len(ax.lines))
    log loss 5
  """
  try:
    from matplotlib.figure import Figure
  except ImportError:
    raise ImportError(
      "posthoc.plot_sweep needs matplotlib: `pip install matplotlib` (or the "
      "`demo` extra, `pip install optax-ema[demo]`)."
    ) from None
  rows = list(rows)
  _validation.check_rows(rows)
  order = np.argsort([r.sigma_rel for r in rows])
  rows = [rows[i] for i in order]
  values, label = _values(rows, key)
  widths = np.array([r.sigma_rel for r in rows])
  poor = np.array([r.fit_error > _solver.FIT_ERROR_WARNING for r in rows])
  if ax is None:
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  ax.plot(widths, values, "-", color="C0")
  ax.plot(widths[~poor], values[~poor], "o", color="C0", label=label)
  if poor.any():
    ax.plot(
      widths[poor],
      values[poor],
      "o",
      mfc="none",
      color="C0",
      label=f"fit_error > {_solver.FIT_ERROR_WARNING}",
    )
  for i, s in enumerate(_tracked(tracked)):
    ax.axvline(s, color="C3", ls=":", lw=1, label="tracked" if i == 0 else None)
  ax.set_xscale("log")
  ax.set_xlabel("sigma_rel")
  ax.set_ylabel(label)
  steps = sorted({r.step for r in rows})
  if len(steps) == 1:
    ax.set_title(f"post-hoc sweep at step {steps[0]}")
  ax.legend(fontsize=8)
  return fig
