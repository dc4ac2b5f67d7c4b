"""Checks of :mod:`optax_ema.posthoc`'s arguments.

The widths (``sigma_rel``) are checked by :mod:`._profiles`, as power_ema's.
What needs the snapshots on disk or an open run (their steps, their trees, a
directory's lock) is checked where those are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_every(every: Any) -> int | None:
  """``SnapshotWriter``'s ``every``: None or a positive int."""
  if every is None:
    return None
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f"`every` must be None or a positive int, got {every!r}.")
  return int(every)


def check_snapshot_dtype(dtype: Any) -> np.dtype:
  """``dtype`` as a NumPy floating point dtype JAX can hold; raises naming `dtype`."""
  try:
    out = np.dtype(dtype)
  except TypeError:
    raise TypeError(f"`dtype` must be a floating point dtype, got {dtype!r}.") from None
  if not np.issubdtype(out, np.floating):
    raise ValueError(f"`dtype` must be a floating point dtype, got {out.name}.")
  if jax.dtypes.canonicalize_dtype(out) != out:
    raise ValueError(
      f"`dtype={out.name}` needs 64-bit JAX arrays: enable them with "
      "`jax.config.update('jax_enable_x64', True)`, or store float32."
    )
  return out


def check_directory(directory: Any, argument: str = "directory") -> str:
  """A snapshot directory: a local path (it takes a lock), not a URL.

  Returns:
    The path as a string.
  """
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(
      f"`{argument}` must be a path (a str or os.PathLike), got "
      f"{type(directory).__name__}: an optimizer state passed first? The "
      "directory comes first, e.g. `posthoc.save_snapshot(directory, opt_state)`."
    )
  text = os.fspath(directory)
  if "://" in text:
    raise ValueError(
      f"`{argument}` {text!r} is a URL: snapshot directories must be on a "
      "filesystem that can hold a lock (a local disk or NFS), which object "
      "stores cannot. Write the snapshots to a local or NFS directory and "
      "copy it to the bucket after training."
    )
  return text


def _first(x: Any) -> Any:
  return x.addressable_data(0) if isinstance(x, jax.Array) else x


def check_resume_from(
  resume_from: Any, state_count: Callable[[Any], Any]
) -> int | None:
  """The count a run resumes from: an int, or the count of a power-EMA state.

  Args:
    resume_from: None, a count (an int or an integer scalar array) or an
      optimizer state.
    state_count: the count of the power-EMA state inside an optimizer state
      (raises when there is none).

  Returns:
    The count, or None for a new run.
  """
  if resume_from is None:
    return None
  if isinstance(resume_from, (bool, np.bool_, float, str, bytes, os.PathLike)) or (
    hasattr(resume_from, "dtype") and not jnp.issubdtype(resume_from.dtype, jnp.integer)
  ):
    raise TypeError(
      "`resume_from` must be the restored optimizer state, or its count (an "
      f"integer), got {type(resume_from).__name__}: {resume_from!r}."
    )
  if isinstance(resume_from, (int, np.integer)):
    count = int(resume_from)
  elif hasattr(resume_from, "dtype"):  # a NumPy or JAX integer array
    if np.ndim(resume_from) != 0:
      raise ValueError(
        f"`resume_from` as a count must be a scalar, got shape {np.shape(resume_from)}."
      )
    count = int(np.asarray(jax.device_get(_first(resume_from))))
  else:
    count = int(np.asarray(jax.device_get(_first(state_count(resume_from)))))
  if count < 0:
    raise ValueError(f"`resume_from` must be a count >= 0, got {count}.")
  return count


def check_snapshot_run(run: Any, run_type: type) -> None:
  """``snapshot_items``'s ``run``: a ``SnapshotRun`` (``run_type``)."""
  if not isinstance(run, run_type):
    raise TypeError(
      f"`run` must be the posthoc.SnapshotRun of the checkpoint directory, got "
      f"{type(run).__name__}: open one with "
      "`with posthoc.SnapshotRun(directory) as run:` around your "
      "CheckpointManager."
    )


def check_step(step: Any, steps: Sequence[int], listing: Callable[[Any], str]) -> int:
  """The step a reconstruction ends at: one of the snapshots' ``steps``.

  Args:
    step: None (the last snapshot's) or an int.
    steps: the snapshots' steps, in order.
    listing: how messages list ``steps``.

  Returns:
    The step.
  """
  if step is None:
    return steps[-1]
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"`step` must be None or an int, got {step!r}.")
  if int(step) not in steps:
    raise ValueError(
      f"`step` must be the step of a snapshot (the average between snapshots "
      f"is not stored), got {step}; the snapshots are at steps "
      f"{listing(steps)}."
    )
  if int(step) <= 0:
    raise ValueError(f"`step` must be > 0 (no update is averaged at step {step}).")
  return int(step)


def check_evaluate(evaluate: Any) -> None:
  """``sweep``'s ``evaluate``: a callable of the params."""
  if not callable(evaluate):
    raise TypeError(f"`evaluate` must be a callable of the params, got {evaluate!r}.")


def check_rows(rows: Sequence[Any]) -> None:
  """``plot_sweep``'s ``rows``: at least one."""
  if not rows:
    raise ValueError("`rows` is empty: pass the rows `posthoc.sweep` returned.")


def check_sweep_key(value: Any, key: Any) -> Any:
  """``plot_sweep``'s ``key`` for rows whose values are like ``value``.

  Returns:
    The key of the value to draw (the only one when ``key`` is None), or
    None for rows that hold one number each.
  """
  if isinstance(value, (Mapping, tuple)):
    names = list(value) if isinstance(value, Mapping) else list(range(len(value)))
    if key is None:
      if len(names) != 1:
        raise ValueError(
          f"The rows hold several values ({names}): pass `key=` to pick the one "
          "to plot."
        )
      key = names[0]
    if key not in names:
      raise ValueError(f"`key` must be one of {names}, got {key!r}.")
    return key
  if key is not None:
    raise ValueError(f"The rows hold one value each: `key` must be None, got {key!r}.")
  return None
