"""Every row against a NumPy EMA of its own parameter trajectory.

The NumPy EMA is the test suite's (``tests/helpers.py``): one reference for
the tests and for the benchmark's own check before it times anything.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from .runner import Row
from .runner import Runner
from .settings import BENCHMARKS
from .settings import DECAY

HELPERS = os.path.join(os.path.dirname(BENCHMARKS), "tests", "helpers.py")


@functools.cache
def references() -> ModuleType:
  """``tests/helpers.py`` (the one the tests import, if they have)."""
  if "helpers" not in sys.modules:
    spec = importlib.util.spec_from_file_location("helpers", HELPERS)
    assert spec is not None and spec.loader is not None, HELPERS
    module = importlib.util.module_from_spec(spec)
    sys.modules["helpers"] = module
    spec.loader.exec_module(module)
  return sys.modules["helpers"]


def check_row(
  row: Row, size: str, steps: int = 3, runner: Runner | None = None
) -> dict[str, Any]:
  """Runs ``steps`` steps of ``row`` and compares its average(s) with NumPy.

  The NumPy EMA follows the row's own parameter trajectory (so peers whose
  Adam differs slightly are still checked exactly). Raises AssertionError on
  a mismatch; returns what was checked.
  """
  runner = runner or row.make(size)
  if row.kind == "bandwidth":
    return _check_kernel(row, runner)
  if row.kind == "floor":
    return _check_floor(row, runner, steps)
  return _check_averages(row, runner, steps)


def _check_kernel(row: Row, runner: Runner) -> dict[str, Any]:
  """A STREAM-like kernel's output (``s = 3``) against NumPy's."""
  state = runner.step(runner.init())
  x, y, z = (np.asarray(v, np.float64) for v in state)
  expected = 3.0 * y if "scale" in row.name else y + 3.0 * z
  np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-7, err_msg=row.name)
  return {"row": row.name, "checked": "kernel output vs NumPy"}


def _check_floor(row: Row, runner: Runner, steps: int) -> dict[str, Any]:
  """The flat EMA, ``steps`` steps towards fixed parameters."""
  state = runner.init()
  e0, p = (np.asarray(v) for v in state[:2])
  for _ in range(steps):
    state = runner.step(state)
  expected = references().np_ema(e0, [p] * steps, [DECAY] * steps)
  np.testing.assert_allclose(
    np.asarray(state[0]), expected, rtol=1e-5, atol=1e-7, err_msg=row.name
  )
  return {"row": row.name, "checked": f"flat EMA vs NumPy over {steps} steps"}


def _check_averages(row: Row, runner: Runner, steps: int) -> dict[str, Any]:
  """Each average of a training row against the EMA of its trajectory."""
  n = steps * runner.update_every
  seen: list[Any] = []  # the first params, the last state and its params

  def trajectory() -> Iterator[list[np.ndarray]]:
    state = runner.init()
    seen[:] = [runner.params(state)]
    yield seen[0]
    for _ in range(n):
      state = runner.step(state)
      params = runner.params(state)
      yield params
    seen[1:] = [state, params]

  expected = references().np_run_emas(
    trajectory(),
    runner.decays,
    convention=runner.convention,
    update_every=runner.update_every,
  )
  first, state, params = seen
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(params, first, strict=True))
  assert moved > 1e-4, f"{row.name}: the parameters did not move ({moved})"
  _compare(row, runner.averages(state), expected, runner.decays, first)
  checked = f"{len(expected)} average(s) vs NumPy over {n} steps"
  return {"row": row.name, "checked": checked}


def _compare(
  row: Row,
  got: list[list[np.ndarray]],
  expected: list[list[np.ndarray]],
  decays: tuple[float, ...],
  first: list[np.ndarray],
) -> None:
  """Asserts the averages match, and that the expected ones moved."""
  assert len(got) == len(decays), (
    f"{row.name}: {len(got)} averages, expected {len(decays)}"
  )
  for average, want, decay in zip(got, expected, decays, strict=True):
    assert len(average) == len(want), row.name
    for a, e in zip(average, want, strict=True):
      np.testing.assert_allclose(
        a, e, rtol=2e-5, atol=2e-6, err_msg=f"{row.name} (decay {decay})"
      )
    stale = max(float(np.max(np.abs(e - p))) for e, p in zip(want, first, strict=True))
    assert stale > 20 * 2e-6, (
      f"{row.name}: the reference average did not move ({stale})"
    )
