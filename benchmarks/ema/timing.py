"""Interleaved timing: every round visits every row, single steps timed."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .runner import Row
from .runner import Runner
from .runner import block


def time_rows(
  rows: list[Row],
  runners: dict[str, Runner],
  size: str,
  rounds: int,
  steps: int,
  log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
  """Interleaved timing: each round visits every row in a rotated order."""
  results: dict[str, dict[str, Any]] = {
    row.name: {"samples_ms": [], "traces_after_warmup": 0} for row in rows
  }
  for r in range(rounds):
    order = rows[r % len(rows) :] + rows[: r % len(rows)]
    for row in order:
      runner = runners[row.name]
      state = runner.init()
      state = runner.step(state)  # compiled on the first round
      block(state)
      traces = runner.traces[0]
      samples = results[row.name]["samples_ms"]
      gc.collect()
      gc.disable()
      try:
        with jax.transfer_guard("disallow"):
          for _ in range(steps):
            t0 = time.perf_counter()
            state = runner.step(state)
            block(state)
            samples.append((time.perf_counter() - t0) * 1e3)
      finally:
        gc.enable()
      results[row.name]["traces_after_warmup"] += runner.traces[0] - traces
      results[row.name]["dispatches_per_step"] = runner.dispatches
      del state
    log(f"  {size}: round {r + 1}/{rounds} done")
  return results


def summarize(samples: list[float]) -> dict[str, float]:
  q25, q50, q75 = np.percentile(samples, [25, 50, 75])
  return {
    "median_ms": float(q50),
    "p25_ms": float(q25),
    "p75_ms": float(q75),
    "min_ms": float(np.min(samples)),
  }
