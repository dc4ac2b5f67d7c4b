"""Averaging on a real GPU: step times, memory and host stalls of each skip form.

The compile-only harness (``python -m benchmarks.accel``) finds what XLA:GPU
allocates for a step; this script measures, on one GPU and the parameter tree
of the harness's 1B Llama-like decoder (float32, layers stacked or unrolled),
what it costs to run:

- ``adam`` alone; the hand-fused step (adam, then
  ``optax.incremental_update(params, ema, 1 - decay)`` in the same jitted,
  donated step); ``moving_average(adam)`` with ``update_every`` 1 and 10 (the
  library's own gate, whatever it compiles to);
- the same hand-fused step gated every 1 and 10 steps by each skip
  formulation: a ``lax.cond``, a 0-or-1-iteration ``lax.while_loop`` and a
  ``jnp.where`` select (which reads and writes the average on every step);
- ``optax.MultiSteps(adam, 4)`` alone and inside ``moving_average``;
- ``offload=True`` with ``update_every`` 1 and 10.

For each row, in a fresh process (so that the device's peak is the row's):
the median time of single steps (``block_until_ready`` after each), the time
to dispatch 50 steps against the time to complete them (a step whose gate the
host waits on dispatches as slowly as it runs), the device's
``memory_stats()["peak_bytes_in_use"]`` and the compiled step's
``memory_analysis()`` (to calibrate the harness's deviceless figures), and the
memory kinds of the state.

Run on a GPU machine (about five minutes on one H200)::

  python benchmarks/gpu_steps.py --out benchmarks/results/gpu_steps.json

``--dry-run`` runs every row in this process on the harness's tiny decoder
tree for a few steps, on any backend (the test suite runs it on the CPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_ema  # noqa: E402
from benchmarks.accel import model as model_lib  # noqa: E402

LEARNING_RATE = 1e-4
DECAY = 0.999
MICRO_STEPS = 4
STALL_STEPS = 50

Step = Callable[[Any, Any, Any], tuple[Any, Any]]


def _transform(tx: optax.GradientTransformation) -> tuple[Callable[[Any], Any], Step]:
  def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx.init, step


def _gated(form: str, every: int) -> tuple[Callable[[Any], Any], Step]:
  """Adam plus a hand-written EMA moved every ``every`` steps by ``form``."""
  adam = optax.adam(LEARNING_RATE)
  weight = 1.0 - DECAY**every

  def init(params: Any) -> Any:
    return adam.init(params), jax.tree.map(jnp.copy, params), jnp.zeros([], jnp.int32)

  def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    inner, ema, count = state
    updates, inner = adam.update(grads, inner, params)
    params = optax.apply_updates(params, updates)
    move = (count + 1) % every == 0

    def average(e: Any) -> Any:
      return optax.incremental_update(params, e, weight)

    if form == "cond":
      ema = jax.lax.cond(move, average, lambda e: e, ema)
    elif form == "while_loop":
      _, ema = jax.lax.while_loop(
        lambda carry: carry[0],
        lambda carry: (jnp.bool_(False), average(carry[1])),
        (move, ema),
      )
    elif form == "select":
      ema = jax.tree.map(lambda n, e: jnp.where(move, n, e), average(ema), ema)
    else:
      raise ValueError(f"`form` must be cond, while_loop or select, got {form!r}.")
    return params, (inner, ema, optax.safe_increment(count))

  return init, step


def _adam() -> optax.GradientTransformation:
  return optax.adam(LEARNING_RATE)


def _multi() -> optax.GradientTransformation:
  return optax.MultiSteps(
    _adam(), every_k_schedule=MICRO_STEPS
  ).gradient_transformation()


def rows() -> dict[str, Callable[[], tuple[Callable[[Any], Any], Step]]]:
  """Row name -> builder of ``(init, step)``."""
  ma = optax_ema.moving_average
  out: dict[str, Callable[[], tuple[Callable[[Any], Any], Step]]] = {
    "adam": lambda: _transform(_adam()),
    "hand-fused": _fused,
    "moving_average, update_every=1": lambda: _transform(ma(_adam(), DECAY)),
    "moving_average, update_every=10": lambda: _transform(
      ma(_adam(), DECAY, update_every=10)
    ),
  }
  for every in (1, 10):
    for form in ("cond", "while_loop", "select"):
      out[f"hand-fused, {form}, every {every}"] = lambda f=form, k=every: _gated(f, k)
  out["MultiSteps(adam, 4)"] = lambda: _transform(_multi())
  out["moving_average(MultiSteps(adam, 4))"] = lambda: _transform(ma(_multi(), DECAY))
  for every in (1, 10):
    out[f"offload, update_every={every}"] = lambda k=every: _transform(
      ma(_adam(), DECAY, update_every=k, offload=True)
    )
  return out


def _fused() -> tuple[Callable[[Any], Any], Step]:
  adam = _adam()

  def init(params: Any) -> Any:
    return adam.init(params), jax.tree.map(jnp.copy, params)

  def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    inner, ema = state
    updates, inner = adam.update(grads, inner, params)
    params = optax.apply_updates(params, updates)
    return params, (inner, optax.incremental_update(params, ema, 1.0 - DECAY))

  return init, step


def params_tree(size: str, layout: str) -> Any:
  config = model_lib.CONFIGS[size]
  abstract = model_lib.abstract_params(config, layout == "scan")
  return jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), abstract)


def _memory() -> dict[str, int]:
  stats = jax.devices()[0].memory_stats() or {}
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keys if k in stats}


_ANALYSIS_FIELDS = (
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "alias_size_in_bytes",
  "temp_size_in_bytes",
  "peak_memory_in_bytes",
  "host_argument_size_in_bytes",
  "host_temp_size_in_bytes",
)


def _timed(compiled: Any, params: Any, grads: Any, state: Any, steps: int) -> tuple:
  """``(params, state, figures)``: single steps timed, then a run dispatched."""
  for _ in range(2):  # warm up
    params, state = compiled(params, grads, state)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, state = compiled(params, grads, state)
    jax.block_until_ready((params, state))
    times.append((time.perf_counter() - t) * 1e3)
  n = STALL_STEPS if steps >= 10 else steps
  t = time.perf_counter()
  for _ in range(n):
    params, state = compiled(params, grads, state)
  dispatched = time.perf_counter() - t
  jax.block_until_ready((params, state))
  completed = time.perf_counter() - t
  return (
    params,
    state,
    {
      "median_ms": statistics.median(times),
      "min_ms": min(times),
      "steps_timed": steps,
      "stall_steps": n,
      "dispatch_ms_per_step": dispatched / n * 1e3,
      "complete_ms_per_step": completed / n * 1e3,
      "dispatch_over_complete": dispatched / completed,
    },
  )


def _program(compiled: Any, state: Any) -> dict[str, Any]:
  """Where the state lives, and the gates and host copies the program holds."""
  kinds = sorted(
    {
      str(x.sharding.memory_kind)
      for x in jax.tree.leaves(state)
      if hasattr(x, "sharding")
    }
  )
  hlo = compiled.as_text()
  return {
    "state_memory_kinds": kinds,
    "conditionals": hlo.count(" conditional("),
    "loops": hlo.count(" while("),
    "host_copies": sum(
      1 for line in hlo.splitlines() if " copy-start(" in line and "S(5)" in line
    ),
  }


def measure(name: str, size: str, layout: str, steps: int) -> dict[str, Any]:
  """One row: compile, init, time single steps, then 50 dispatched steps."""
  init, step = rows()[name]()
  params = params_tree(size, layout)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
  jitted = jax.jit(step, donate_argnums=(0, 2))
  state = jax.jit(init)(params)
  jax.block_until_ready(state)
  after_init = _memory()
  t0 = time.perf_counter()
  compiled = jitted.lower(params, grads, state).compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  analysis = {k: getattr(m, k, None) for k in _ANALYSIS_FIELDS}
  # The steps run the executable compiled above.
  params, state, timing = _timed(compiled, params, grads, state, steps)
  out = {
    "row": name,
    "num_params": sum(x.size for x in jax.tree.leaves(params)),
    "compile_s": compile_s,
    **timing,
    "memory_after_init": after_init,
    "memory_after_steps": _memory(),
    "memory_analysis": analysis,
    **_program(compiled, state),
  }
  del params, state
  return out


def _in_subprocess(name: str, size: str, layout: str, steps: int) -> dict[str, Any]:
  cmd = [sys.executable, __file__, "--row", name, "--size", size, "--layout", layout]
  cmd += ["--steps", str(steps)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  if done.returncode != 0:
    return {"row": name, "error": done.stderr[-3000:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="1b", choices=sorted(model_lib.CONFIGS))
  parser.add_argument("--layout", default="scan", choices=("scan", "unrolled"))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--only", default="", help="rows whose name holds this text")
  parser.add_argument("--dry-run", action="store_true", help="tiny tree, in process")
  parser.add_argument("--row", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.row:  # one row, in its own process: print its JSON line
    print(json.dumps(measure(args.row, args.size, args.layout, args.steps)))
    return {}
  if args.dry_run:
    args.size, args.steps = "tiny", 3
  names = [n for n in rows() if args.only in n]
  results = []
  for name in names:
    if args.dry_run:
      result = measure(name, args.size, args.layout, args.steps)
    else:
      result = _in_subprocess(name, args.size, args.layout, args.steps)
    results.append(result)
    print(json.dumps(result), flush=True)
  report = {
    "device": str(jax.devices()[0]),
    "device_kind": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "jaxlib": importlib.metadata.version("jaxlib"),
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    "size": args.size,
    "layout": args.layout,
    "dry_run": args.dry_run,
    "rows": results,
  }
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
