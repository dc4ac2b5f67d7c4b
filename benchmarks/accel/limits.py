"""Two XLA:TPU limits, reproduced without optax_ema, for compiler bug reports.

Each reproduction compiles a plain-JAX optimizer step on the decoder's
parameters (FSDP, layers stacked), once in a control form that needs no
device temporaries and once in the form that shows the limit, and reports
the temporaries per chip in units of the parameter bytes per chip (P):

- ``finite_gate``: an average moved inside a ``while`` loop of zero or one
  iteration. Predicated on the step count, the loop needs no temporaries;
  predicated on whether the new params are all finite (what
  ``skip_nonfinite`` asks), XLA:TPU keeps part of the new params beside it.
- ``host_gate``: averages kept in host memory and moved by the host's CPU
  (``compute_on("device_host")``), the new params going over one leaf after
  the other. Every step, no device temporaries; inside a ``lax.cond`` (what
  ``update_every`` with ``offload`` asks), XLA:TPU gives the transfers
  device buffers of their own.

``python -m benchmarks.accel --limits`` writes
``benchmarks/results/accel_limits.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on
from jax.sharding import NamedSharding

from . import model as model_lib
from . import targets as targets_lib

LR, DECAY = 1e-3, 0.999


def _setup(target: str, model: str) -> tuple[Any, Any, Any, float]:
  """Abstract params, their specs (FSDP, stacked layers), param bytes per chip."""
  c = model_lib.CONFIGS[model]
  mesh = targets_lib.mesh(targets_lib.TARGETS[target], tensor_parallel=False)
  rules = model_lib.rules(tensor_parallel=False)
  specs = jax.tree.map(
    lambda axes: model_lib.spec(axes, rules),
    model_lib.param_axes(c, scan=True),
    is_leaf=model_lib.is_axes,
  )
  params = model_lib.abstract_params(c, scan=True)
  per_chip = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return params, mesh, specs, per_chip / mesh.size


def _abstract(params: Any, mesh: Any, specs: Any, kind: str | None = None) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, s, memory_kind=kind)
    ),
    params,
    specs,
  )


def _temps(
  fn: Callable[..., Any], args: tuple[Any, ...], per_chip: float
) -> dict[str, float]:
  memory = (
    jax.jit(fn, donate_argnums=(0, 1, 2, 3)).lower(*args).compile().memory_analysis()
  )
  return {
    "temp": memory.temp_size_in_bytes / per_chip,
    "host_temp": memory.host_temp_size_in_bytes / per_chip,
  }


def _sgd_momentum(p: Any, m: Any, g: Any) -> tuple[Any, Any]:
  m = jax.tree.map(lambda m, g: 0.9 * m + g, m, g)
  return jax.tree.map(lambda p, m: p - LR * m, p, m), m


def finite_gate(target: str, model: str = "1b") -> dict[str, Any]:
  """Temporaries of a loop-gated average: count-predicated, finite-predicated."""
  params, mesh, specs, per_chip = _setup(target, model)
  out: dict[str, Any] = {}
  for predicate in ("count", "finite"):

    def step(p: Any, m: Any, ema: Any, count: Any, g: Any, predicate=predicate) -> Any:
      new, m = _sgd_momentum(p, m, g)
      if predicate == "count":
        flag = count % 10 == 0
      else:
        flag = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(new)]))

      def body(state: Any) -> Any:
        i, e = state
        return i + 1, jax.tree.map(lambda e, n: e + (1 - DECAY) * (n - e), e, new)

      _, ema = jax.lax.while_loop(
        lambda state: state[0] < flag.astype(jnp.int32), body, (jnp.int32(0), ema)
      )
      return new, m, ema, count + 1

    tree = _abstract(params, mesh, specs)
    count = jax.ShapeDtypeStruct((), jnp.int32)
    out[predicate] = _temps(step, (tree, tree, tree, count, tree), per_chip)
  return out


def host_gate(target: str, model: str = "1b") -> dict[str, Any]:
  """Temporaries of averages the host moves: every step, and inside a cond."""
  params, mesh, specs, per_chip = _setup(target, model)

  @compute_on("device_host")
  @jax.jit
  def host_step(e: Any, n: Any) -> Any:
    return e + (1 - DECAY) * (n - e)

  def move(new: Any, ema: Any) -> Any:
    moved, last = [], None
    for e, n in zip(jax.tree.leaves(ema), jax.tree.leaves(new), strict=True):
      if last is not None:  # one leaf's params in transit at a time
        n, _ = jax.lax.optimization_barrier((n, last))
      n = jax.lax.optimization_barrier(jax.device_put(n, jax.memory.Space.Host))
      last = jax.device_put(host_step(e, n), jax.memory.Space.Host)
      moved.append(last)
    return jax.tree.unflatten(jax.tree.structure(ema), moved)

  out: dict[str, Any] = {}
  for gated in (False, True):

    def step(p: Any, m: Any, ema: Any, count: Any, g: Any, gated=gated) -> Any:
      new, m = _sgd_momentum(p, m, g)
      if gated:
        ema = jax.lax.cond(count % 10 == 0, lambda e: move(new, e), lambda e: e, ema)
      else:
        ema = move(new, ema)
      return new, m, ema, count + 1

    tree = _abstract(params, mesh, specs)
    host = _abstract(params, mesh, specs, "pinned_host")
    count = jax.ShapeDtypeStruct((), jnp.int32)
    out["cond" if gated else "every step"] = _temps(
      step, (tree, tree, host, count, tree), per_chip
    )
  return out


def run(targets: tuple[str, ...] = ("v5e-256", "v6e-256", "v5p-128")) -> dict[str, Any]:
  """Both reproductions on each target, 1B model."""
  return {
    t: {"finite_gate": finite_gate(t), "host_gate": host_gate(t)} for t in targets
  }
