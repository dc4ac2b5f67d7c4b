"""A row of the table, and the runner it builds for one size."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass
class Runner:
  """One row, set up for one size: a step function over an opaque state.

  Attributes:
    init: returns a fresh state (parameters, optimizer state, average).
    step: one training step, ``state -> state`` (the dispatches it makes are
      what is timed).
    params: host copies of the parameter leaves of a state (a list).
    averages: host copies of the averaged leaves, one list per average.
    memory: XLA compiled memory analysis of the step, per jitted call.
    traces: how many times the step functions were traced.
    dispatches: jitted calls per training step.
    convention: how the average starts: "copy" (average_0 = params_0) or
      "keras" (the first step copies the new params).
    decays: the decay of each average and its update period.
  """

  init: Callable[[], Any]
  step: Callable[[Any], Any]
  params: Callable[[Any], list[np.ndarray]]
  averages: Callable[[Any], list[list[np.ndarray]]]
  memory: Callable[[Any], list[dict[str, int]]]
  traces: list[int]
  dispatches: int = 1
  convention: str = "copy"
  decays: tuple[float, ...] = ()
  update_every: int = 1


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  group: str
  baseline: str | None  # row the EMA overhead is measured against
  make: Callable[[str], Runner]
  kind: str = "step"  # "step", "floor" or "bandwidth"


def host_leaves(tree: Any) -> list[np.ndarray]:
  return [np.array(x) for x in jax.tree.leaves(tree)]  # copies, never views


def block(state: Any) -> None:
  jax.block_until_ready(jax.tree.leaves(state))
