"""The one way a step skips work: ``fn(carry)`` when a flag holds, else ``carry``.

Every in-graph gate of the package (the averaging pass on steps that do not
average, SWA between snapshots, the periodic overwrite) goes through
:func:`skip_unless`, so that a skipped step costs the same everywhere: it
reads and writes none of the carried buffers and needs no device buffer of
their size.

How that is written depends on the compiler, and is chosen per lowering
platform with ``jax.lax.platform_dependent`` (so the choice follows the
platform a step is compiled for, also ahead of time for another one, not the
machine it is traced on):

- XLA:GPU copies the operands of a ``conditional`` into fresh buffers (a
  temporary the size of the carried averages), but runs a ``while`` loop on
  its carry in place: there the gate is a loop of zero or one iteration.
- XLA:TPU does the same on some slices (a v5p-128 slice: +1.44x the
  parameter bytes per chip with a conditional, 0 with the loop, for a 1B
  model with ``update_every`` or ``MultiSteps``; on v5e and v6e slices both
  need 0): the loop there too. But where the averages live in host memory
  (``offload``, ``host_memory=True``), a loop makes XLA:TPU relayout the
  carried host buffers through device memory (over 3x in a trial on
  v5e-256), and a conditional costs less (+0.97x).
- XLA:CPU runs a ``conditional`` in place; there it is a ``lax.cond`` whose
  other branch forwards the carry.

Either way the compiler sees one construct: ``platform_dependent`` resolves
the platform while lowering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import TypeVar

import jax
import jax.numpy as jnp

_Carry = TypeVar("_Carry")

# "cond" or "while" forces one formulation on every platform (benchmarks that
# compare them set it); None chooses per lowering platform.
FORCE: str | None = None


def _with_cond(
  flag: jax.Array, fn: Callable[..., _Carry], carry: _Carry, *consts: Any
) -> _Carry:
  return jax.lax.cond(flag, fn, lambda c, *_: c, carry, *consts)


def _with_loop(
  flag: jax.Array, fn: Callable[..., _Carry], carry: _Carry, *consts: Any
) -> _Carry:
  """``fn`` in a ``while`` loop that runs once when ``flag`` holds, else never."""
  trips = jnp.asarray(flag, jnp.int32)

  def body(state: tuple[jax.Array, _Carry]) -> tuple[jax.Array, _Carry]:
    i, c = state
    return i + 1, fn(c, *consts)

  _, out = jax.lax.while_loop(lambda s: s[0] < trips, body, (jnp.int32(0), carry))
  return out


def skip_unless(
  flag: jax.Array,
  fn: Callable[..., _Carry],
  carry: _Carry,
  *consts: Any,
  host_memory: bool = False,
) -> _Carry:
  """``fn(carry, *consts)`` if the scalar bool ``flag`` holds, else ``carry``.

  ``fn`` must return a tree of the structure, shapes, dtypes and memory kinds
  of ``carry``. On a step where ``flag`` is False nothing of ``carry`` is read
  or written and no buffer of its size is allocated (on GPU and TPU a
  ``while`` loop of zero or one iteration, on CPU a ``lax.cond``; see the
  module docstring). ``consts`` are read only when ``fn`` runs. ``host_memory``:
  ``carry`` holds buffers in host memory (a conditional on TPU then).
  """
  loop = lambda f, c, *k: _with_loop(f, fn, c, *k)
  cond = lambda f, c, *k: _with_cond(f, fn, c, *k)
  if FORCE == "cond":
    return cond(flag, carry, *consts)
  if FORCE == "while":
    return loop(flag, carry, *consts)
  return jax.lax.platform_dependent(
    flag,
    carry,
    *consts,
    cuda=loop,
    rocm=loop,
    tpu=cond if host_memory else loop,
    default=cond,
  )
