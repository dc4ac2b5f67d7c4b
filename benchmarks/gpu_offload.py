"""Host offload on an accelerator: device memory saved, and what a step costs.

For one parameter tree of ``--params`` float32 parameters trained by
``optax.adam``, this measures ``moving_average(adam)`` with the averages in
device memory and with ``offload=True`` (in the ``pinned_host`` memory of the
device), at ``update_every`` 1 and 10:

- device memory: the device's ``bytes_in_use`` after init and its peak over
  the timed steps (``jax.Device.memory_stats``), against adam alone;
- per-step time (median of jitted, donated steps), and the bytes an
  averaging step moves over the host link (the average down and back: 8
  bytes per parameter), as an effective bandwidth;
- overlap: the offloaded step's time against adam's plus the transfer
  alone (a copy of the same bytes down and back), i.e. how much of the
  transfer hides behind the optimizer's own work;
- the compiled step: an accelerator's offloaded step must hold
  ``copy-start``/``copy-done`` pairs (XLA's asynchronous host transfers),
  and a step that does not average (``update_every`` > 1) none outside the
  conditional's averaging branch.

Run on a GPU machine (about two minutes at the default size on one H200)::

  python benchmarks/gpu_offload.py --out benchmarks/results/gpu_offload.json

``--smoke`` runs a tiny configuration on any backend, CPU included (where
XLA drops memory moves when it lowers, so the HLO check is reported, not
asserted); the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_ema


def _tree(num_params: int) -> Any:
  """A transformer-like tree: a few big matrices and small vectors."""
  width = 4096
  rows = max(1, num_params // (width * 8))
  leaves = {f"layer{i}": {"w": (rows, width), "b": (width,)} for i in range(8)}
  return jax.tree.map(
    lambda s: jnp.full(s, 0.01, jnp.float32),
    leaves,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _memory() -> dict[str, int]:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def _copies(hlo: str) -> dict[str, int]:
  return {op: hlo.count(f" {op}(") for op in ("copy-start", "copy-done")}


def measure(tx: Any, params: Any, steps: int) -> dict[str, Any]:
  params = jax.tree.map(jnp.copy, params)  # the steps donate it
  grads = jax.tree.map(jnp.ones_like, params)

  def step(params: Any, state: Any) -> Any:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1))
  state = jax.jit(tx.init)(params)
  jax.block_until_ready(state)
  after_init = _memory()
  compiled = jitted.lower(params, state).compile()
  params, state = jitted(params, state)  # warm up
  jax.block_until_ready((params, state))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = jitted(params, state)
    jax.block_until_ready((params, state))
    times.append((time.perf_counter() - t0) * 1e3)
  kinds = {
    x.sharding.memory_kind for x in jax.tree.leaves(state) if hasattr(x, "sharding")
  }
  out = {
    "median_ms": statistics.median(times),
    "min_ms": min(times),
    "memory_after_init": after_init,
    "memory_after_steps": _memory(),
    "copies": _copies(compiled.as_text()),
    "memory_kinds": sorted(kinds),
  }
  del params, state
  return out


def transfer_ms(num_params: int, steps: int) -> float:
  """A copy of ``num_params`` float32 to host memory and back, alone."""
  x = jnp.zeros(num_params, jnp.float32)
  there = jax.jit(lambda a: jax.device_put(a, jax.memory.Space.Host))
  back = jax.jit(lambda a: jax.device_put(a, jax.memory.Space.Device))
  jax.block_until_ready(back(there(x)))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(back(there(x)))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--params", type=float, default=1e9)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.smoke:
    args.params, args.steps = 2**16, 3
  params = _tree(int(args.params))
  n = sum(x.size for x in jax.tree.leaves(params))
  accelerator = jax.default_backend() != "cpu"
  rows: dict[str, Any] = {"adam": measure(optax.adam(1e-4), params, args.steps)}
  for every in (1, 10):
    for offload in (False, True):
      name = f"moving_average(adam, update_every={every}, offload={offload})"
      tx = optax_ema.moving_average(
        optax.adam(1e-4), 0.999, update_every=every, offload=offload
      )
      rows[name] = measure(tx, params, args.steps)
  link_ms = transfer_ms(n, args.steps)
  report = {
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "num_params": n,
    "param_bytes": 4 * n,
    "transfer_down_and_back_ms": link_ms,
    "link_gbs": 8 * n / link_ms / 1e6,
    "rows": rows,
  }
  adam = rows["adam"]["median_ms"]
  for every in (1, 10):
    on = rows[f"moving_average(adam, update_every={every}, offload=False)"]
    off = rows[f"moving_average(adam, update_every={every}, offload=True)"]
    used = lambda r: r["memory_after_init"].get("bytes_in_use", 0)
    report[f"update_every={every}"] = {
      "device_bytes_saved": used(on) - used(off),
      "offload_over_on_device": off["median_ms"] / on["median_ms"],
      "hidden_transfer_fraction": 1 - (off["median_ms"] - adam) / (link_ms / every),
    }
    if accelerator:  # CPU drops host/device moves when it lowers
      assert off["copies"]["copy-start"] > 0, off["copies"]
      assert off["copies"]["copy-start"] == off["copies"]["copy-done"]
      assert "pinned_host" in off["memory_kinds"]
  print(json.dumps(report, indent=1))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
