"""Post-hoc EMA at scale: reconstruction memory and time, and accuracy vs EDM2.

Memory and time. A transformer-like float32 model (64M parameters in 195
leaves by default) is given 16 snapshots of 2 power-EMA profiles in float16
(about 4 GB of Orbax checkpoints, written to a temporary directory under
/tmp and deleted afterwards). Then ``posthoc.reconstruct`` synthesizes
sigma_rel 0.07 three ways, each in a fresh subprocess:

- ``host``: ``reconstruct(dir, 0.07)``, NumPy on the host;
- ``sharded``: ``reconstruct(dir, 0.07, like=...)`` into ``jax.Array``s
  sharded over the CPU devices (2 here);
- ``naive``: restore every profile of every snapshot, then sum them in
  float64 with the same coefficients (what a straightforward script does).

Each reports wall time, peak host RSS above the RSS before the call
(``VmHWM`` minus ``VmRSS``; on the CPU backend device arrays live in host
memory too, so this includes them) and the peak of live ``jax.Array`` bytes
(sampled every 2 ms: the device memory where there is a device). The
streaming paths also run with the first 4 snapshots only, to show that their
peak does not grow with the number of snapshots. The script asserts the
bounds: a streaming path's peak stays within ``RSS_BYTES_PER_PARAM`` bytes
per parameter plus ``RSS_SLACK_MIB``, and grows by at most ``GROWTH_MIB``
from 4 to 16 snapshots. Every path runs under glibc's default malloc and
with a fixed mmap threshold; the bounds are checked with the latter, since
under the default RSS also counts freed memory the allocator keeps (see
``ALLOCATORS``). The float32 accumulation error is measured against
the naive float64 sum.

Accuracy. A random walk with drift is averaged by ``power_ema`` (profiles
0.05 and 0.10, float16 and float32 snapshots); targets are reconstructed
from 2 to 20 snapshots and compared with the exact power EMA of the walk,
next to a NumPy restatement of EDM2's normalised solver (written here from
the paper) applied to the same stored snapshots in float64, and to the
unnormalised least squares of optax_ema 0.1.0.

Run (about 4 minutes on a 2-core CPU box; timings on a shared machine are
noisy)::

  python benchmarks/bench_posthoc.py            # writes benchmarks/results/
  python benchmarks/bench_posthoc.py --quick    # small smoke configuration
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# A streaming path holds a float32 accumulator (4 B/param) and one float16
# profile (2 B/param), plus Orbax's read buffers for that profile (at most
# 2 B/param) and constants (XLA compilation, thread pools).
RSS_BYTES_PER_PARAM = 8.0
RSS_SLACK_MIB = 256.0
GROWTH_MIB = 64.0
TARGET = 0.07
SIGMA_RELS = (0.05, 0.10)

# name -> (layers, width, parameters, snapshots, snapshots in the small run)
CONFIGS = {
  "full": (16, 512, 64_000_000, 16, 4),
  "quick": (1, 32, 40_000, 3, 2),
}
# name -> (walk length, dimension, snapshot counts, targets)
ACCURACY = {
  "full": (2000, 256, (2, 4, 10, 20), (0.03, 0.07, 0.15)),
  "quick": (200, 16, (2, 4), (0.07,)),
}


# --- the model and its snapshots -----------------------------------------------


def model_shapes(layers: int, d: int, total: int) -> dict[str, tuple[int, ...]]:
  """Flat {name: shape} of an embedding and ``layers`` transformer blocks."""
  block = {
    "ln1_scale": (d,),
    "ln1_bias": (d,),
    "qkv_w": (d, 3 * d),
    "qkv_b": (3 * d,),
    "out_w": (d, d),
    "out_b": (d,),
    "ln2_scale": (d,),
    "ln2_bias": (d,),
    "mlp_w1": (d, 4 * d),
    "mlp_b1": (4 * d,),
    "mlp_w2": (4 * d, d),
    "mlp_b2": (d,),
  }
  per_block = sum(int(np.prod(s)) for s in block.values())
  shapes = {"embed": (max(1, (total - layers * per_block - 2 * d) // d), d)}
  for i in range(layers):
    shapes |= {f"layer_{i:02d}_{k}": s for k, s in block.items()}
  return shapes | {"final_scale": (d,), "final_bias": (d,)}


def write_snapshots(directory: pathlib.Path, shapes: dict, count: int) -> float:
  """``count`` float16 snapshots of 2 profiles; returns the seconds taken."""
  import jax
  import jax.numpy as jnp

  import optax_ema
  from optax_ema import posthoc

  @jax.jit
  def profile(seed: Any, step: Any) -> dict:
    # Weights of either sign and many magnitudes, from hashed noise: Orbax
    # compresses its chunks, and real weights do not compress much either.
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
      u = jax.lax.iota(jnp.uint32, int(np.prod(shape))) * jnp.uint32(0x9E3779B1)
      u = u + (seed * 7919 + i).astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
      for shift, mul in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 1)):
        u = (u ^ (u >> shift)) * jnp.uint32(mul)
      noise = u.astype(jnp.float32) / 2.0**32 - 0.5
      out[name] = (0.1 * noise * (1.0 + noise) + 1e-3 * step).reshape(shape)
    return out

  start = time.perf_counter()
  with posthoc.SnapshotWriter(directory) as writer:
    for i in range(1, count + 1):
      averages = {
        repr(s): profile(jnp.asarray(10 * i + j), float(i))
        for j, s in enumerate(SIGMA_RELS)
      }
      count_ = jnp.asarray(1000 * i, jnp.int32)
      writer.save(optax_ema.PowerEmaState((), averages, count_))
      del averages
  return time.perf_counter() - start


# --- one measurement (in a worker process) -------------------------------------


def _status(field: str) -> float:
  """A /proc/self/status field in MiB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise KeyError(field)


class _LiveArrays:
  """Samples the bytes of this process's shards of live jax.Arrays (a thread)."""

  def __init__(self) -> None:
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    import jax

    while not self._stop.wait(0.002):
      live = 0
      for x in jax.live_arrays():  # (x.addressable_shards would add arrays)
        shard = x.sharding.shard_shape(x.shape)
        devices = len(x.sharding.addressable_devices)
        live += int(np.prod(shard)) * x.dtype.itemsize * devices
      self.peak = max(self.peak, live)

  def __enter__(self) -> _LiveArrays:
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._stop.set()
    self._thread.join()


def _naive(directory: str, step: int) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp

  from optax_ema import posthoc

  weights = posthoc.reconstruction_weights(directory, TARGET, step)
  loaded = []
  for snap in posthoc.load_snapshots(directory):
    if snap.step > step:
      continue
    meta = ocp.PyTreeCheckpointHandler().metadata(snap.path / "power_ema").tree
    args = {
      k: {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in v}
      for k, v in meta.items()
    }
    item = ocp.PyTreeCheckpointer().restore(
      snap.path / "power_ema", args=ocp.args.PyTreeRestore(restore_args=args)
    )
    loaded += [item[k] for k in snap.keys]  # everything in memory at once
  out = {name: np.zeros(x.shape, np.float64) for name, x in loaded[0].items()}
  for c, profile in zip(weights.coefficients, loaded, strict=True):
    for name, x in profile.items():
      out[name] += c * x.astype(np.float64)
  return out


def measure(
  mode: str, directory: str, step: int, result_path: str, allocator: str
) -> dict:
  """Reconstructs TARGET at ``step`` by ``mode``; time and peak memory.

  ``allocator`` only labels the row (the worker's environment sets it).
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from optax_ema import posthoc

  like = None
  if mode == "sharded":
    (snap, *_) = posthoc.load_snapshots(directory)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("model",))
    like = {
      name: jax.ShapeDtypeStruct(
        s.shape,
        np.float32,
        sharding=NamedSharding(mesh, P(*([None] * (len(s.shape) - 1)), "model")),
      )
      for name, s in snap.tree.items()
    }
  pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
  base = _status("VmRSS")
  start = time.perf_counter()
  with _LiveArrays() as live:
    if mode == "naive":
      out = _naive(directory, step)
    else:
      out = posthoc.reconstruct(directory, TARGET, step, like=like)
      jax.block_until_ready(out)
  wall = time.perf_counter() - start
  peak = _status("VmHWM")
  np.savez(result_path, **{k: np.asarray(v) for k, v in out.items()})
  return {
    "mode": mode,
    "step": step,
    "wall_s": wall,
    "peak_rss_over_base_mib": peak - base,
    "base_rss_mib": base,
    "peak_live_arrays_mib": live.peak / 2**20,
    "devices": jax.device_count(),
  }


def _worker(jobs: list[dict]) -> None:
  if len(jobs) > 1:  # one process for all: first-use costs out of the figures
    for mode in dict.fromkeys(job["mode"] for job in jobs):
      measure(**next(job for job in jobs if job["mode"] == mode))
  for job in jobs:
    print(json.dumps(measure(**job)), flush=True)


# glibc's malloc raises its mmap threshold as large blocks are freed, after
# which the buffers Orbax's reader threads allocate and free fragment the heap
# and RSS creeps up with the number of reads (data no longer held). Fixing
# the threshold (at its default initial value) turns that off.
ALLOCATORS = {
  "glibc default": {},
  "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}
BOUNDED = "fixed mmap threshold"  # the allocator the bounds are checked with


def run_jobs(jobs: list[dict], fresh: bool) -> list[dict]:
  """Runs measurements in worker processes: one per job when ``fresh``, else
  one per allocator setting."""
  env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  groups: dict[Any, list[dict]] = {}
  for i, job in enumerate(jobs):
    groups.setdefault(i if fresh else job["allocator"], []).append(job)
  out = []
  for group in groups.values():
    allocator = group[0]["allocator"]
    proc = subprocess.run(
      [sys.executable, __file__, "--_worker", json.dumps(group)],
      env=env | ALLOCATORS[allocator],
      capture_output=True,
      text=True,
      check=False,
      timeout=1800,
    )
    if proc.returncode != 0:
      raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    out += [row | {"allocator": allocator} for row in rows]
  return out


def run_memory(config: str, root: pathlib.Path) -> dict:
  """Writes the snapshots, measures every path, checks the bounds."""
  layers, d, total, count, few = CONFIGS[config]
  shapes = model_shapes(layers, d, total)
  n = int(sum(np.prod(s) for s in shapes.values()))
  directory = root / "snapshots"
  write_s = write_snapshots(directory, shapes, count)
  written = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
  last = 1000 * count
  plan = [("naive", last, "glibc default")] + [
    (mode, step, allocator)
    for allocator in ALLOCATORS
    for mode in ("host", "sharded")
    for step in (1000 * few, last)
  ]
  jobs = [
    {
      "mode": mode,
      "directory": str(directory),
      "step": step,
      "result_path": str(root / f"result{i}.npz"),
      "allocator": allocator,
    }
    for i, (mode, step, allocator) in enumerate(plan)
  ]
  rows = run_jobs(jobs, fresh=config != "quick")
  rows.sort(key=lambda r: plan.index((r["mode"], r["step"], r["allocator"])))
  naive = np.load(jobs[0]["result_path"])
  scale = max(float(np.max(np.abs(naive[k]))) for k in naive.files)
  for row, job in zip(rows, jobs, strict=True):
    if row["step"] == last and row["mode"] != "naive":
      got = np.load(job["result_path"])
      diff = max(float(np.max(np.abs(got[k] - naive[k]))) for k in naive.files)
      row["max_abs_error_vs_float64"] = diff
      row["max_error_relative_to_max_abs"] = diff / scale
  return {
    "params": n,
    "leaves": len(shapes),
    "snapshots": count,
    "profiles": len(SIGMA_RELS),
    "bytes_written": written,
    "write_s": write_s,
    "rows": rows,
    "checks": check_bounds(rows, n),
  }


def check_bounds(rows: list[dict], n: int) -> list[dict]:
  """The memory bounds the docs state, evaluated (and asserted by main).

  They are evaluated with the fixed mmap threshold, where RSS measures what
  the process holds; under glibc's default it also counts freed memory the
  allocator keeps, which the table reports.
  """
  limit = RSS_BYTES_PER_PARAM * n / 2**20 + RSS_SLACK_MIB
  checks = []
  for mode in ("host", "sharded"):
    few, full = sorted(
      (r for r in rows if (r["mode"], r["allocator"]) == (mode, BOUNDED)),
      key=lambda r: r["step"],
    )
    checks.append(
      {
        "check": f"{mode}: peak RSS <= {RSS_BYTES_PER_PARAM:g} B/param + "
        f"{RSS_SLACK_MIB:.0f} MiB = {limit:.0f} MiB",
        "value": full["peak_rss_over_base_mib"],
        "ok": full["peak_rss_over_base_mib"] <= limit,
      }
    )
    growth = full["peak_rss_over_base_mib"] - few["peak_rss_over_base_mib"]
    checks.append(
      {
        "check": f"{mode}: peak RSS grows <= {GROWTH_MIB:.0f} MiB from "
        f"{few['step'] // 1000} to {full['step'] // 1000} snapshots",
        "value": growth,
        "ok": growth <= GROWTH_MIB,
      }
    )
  return checks


# --- accuracy against EDM2 --------------------------------------------------------


def edm2_gamma(sigma_rel: float) -> float:
  """EDM2 appendix C.2: the largest real root of the cubic in gamma."""
  t = sigma_rel**-2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def edm2_coefficients(steps, sigmas, target_step, target, normalise=True):
  """EDM2's least squares (Algorithm 3), normalised as its released code."""
  g = np.array([edm2_gamma(s) for s in sigmas])
  t = np.asarray(steps, np.float64)
  gr = edm2_gamma(target)

  def inner(ta, ga, tb, gb):
    m = np.minimum(ta, tb)
    return (
      (ga + 1)
      * (gb + 1)
      / (ga + gb + 1)
      * (m / ta) ** (ga + 1)
      * (m / tb) ** (gb + 1)
      / m
    )

  a = inner(t[:, None], g[:, None], t[None, :], g[None, :])
  x = np.linalg.solve(a, inner(t, g, float(target_step), gr))
  return x / x.sum() if normalise else x


def _walk(length: int, dim: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  start = 1.0 + rng.normal(size=dim)
  moves = 0.002 * rng.normal(size=dim) + 0.01 * rng.normal(size=(length, dim))
  return np.concatenate([start[None], start + np.cumsum(moves, axis=0)])


def _exact(walk: np.ndarray, sigma_rel: float) -> np.ndarray:
  t = len(walk) - 1
  i = np.arange(1, t + 1, dtype=np.float64)
  g = edm2_gamma(sigma_rel)
  return ((i ** (g + 1) - (i - 1) ** (g + 1)) / float(t) ** (g + 1)) @ walk[1:]


def _train(walk: np.ndarray, every: int, dirs: dict) -> None:
  import jax
  import jax.numpy as jnp
  import optax

  import optax_ema
  from optax_ema import posthoc

  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=SIGMA_RELS)
  params = jnp.asarray(walk[0], jnp.float32)
  state = tx.init(params)
  step = jax.jit(tx.update)
  writers = [posthoc.SnapshotWriter(p, every, dtype=dt) for dt, p in dirs.items()]
  for t in range(1, len(walk)):
    updates, state = step(params - jnp.asarray(walk[t], jnp.float32), state, params)
    params = optax.apply_updates(params, updates)
    for writer in writers:
      writer(state, t)
  for writer in writers:
    writer.close()


def _stored(snaps: list) -> list[np.ndarray]:
  import orbax.checkpoint as ocp

  out = []
  for snap in snaps:
    arrays = ocp.PyTreeCheckpointer().restore(
      snap.path / "power_ema",
      args=ocp.args.PyTreeRestore(
        restore_args={k: ocp.RestoreArgs(restore_type=np.ndarray) for k in snap.keys}
      ),
    )
    out += [np.asarray(arrays[k], np.float64) for k in snap.keys]
  return out


def run_accuracy(config: str, root: pathlib.Path) -> list[dict]:
  """One row per (snapshot count, target): errors relative to the exact EMA."""
  from optax_ema import posthoc

  length, dim, counts, targets = ACCURACY[config]
  walk = _walk(length, dim)
  every = length // max(counts)
  dirs = {np.float16: root / "acc16", np.float32: root / "acc32"}
  _train(walk, every, dirs)
  rows = []
  for n in counts:
    steps = set(range(length // n, length + 1, length // n))
    snaps = {
      dt: [s for s in posthoc.load_snapshots(p) if s.step in steps]
      for dt, p in dirs.items()
    }
    stored = _stored(snaps[np.float16])
    in_steps = [s.step for s in snaps[np.float16] for _ in s.keys]
    in_sigmas = [float(x) for s in snaps[np.float16] for x in s.sigma_rels]
    for target in targets:
      exact = _exact(walk, target)
      # The table measures extrapolations on purpose (fit errors up to 0.23
      # with 2 snapshots): their warning is the row's fit_error column.
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "posthoc: the target", UserWarning)

        def rel(x, exact=exact):
          return float(np.linalg.norm(x - exact) / np.linalg.norm(exact))

        w = posthoc.reconstruction_weights(snaps[np.float16], target)
        ref = edm2_coefficients(in_steps, in_sigmas, length, target)
        plain = edm2_coefficients(in_steps, in_sigmas, length, target, False)
        rows.append(
          {
            "snapshots": n,
            "target": target,
            "fit_error": w.fit_error,
            "max_coefficient_difference": float(np.max(np.abs(w.coefficients - ref))),
            "ours_fp16": rel(posthoc.reconstruct(snaps[np.float16], target)),
            "edm2_fp16": rel(sum(c * x for c, x in zip(ref, stored, strict=True))),
            "unnormalised_fp16": rel(
              sum(c * x for c, x in zip(plain, stored, strict=True))
            ),
            "ours_fp32": rel(posthoc.reconstruct(snaps[np.float32], target)),
          }
        )
  return rows


# --- report -------------------------------------------------------------------------


def machine() -> dict:
  import jax
  import orbax.checkpoint as ocp

  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {
    "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(),
    "memory_gib": round(mem, 1),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "orbax_checkpoint": ocp.__version__,
  }


def _markdown_accuracy(report: dict) -> list[str]:
  """The heading and the two accuracy tables."""
  m = report["machine"]
  length, dim, _, _ = ACCURACY[report["config"]]
  lines = [
    f"Run {report['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} "
    f"GiB), jax {m['jax']}, orbax-checkpoint {m['orbax_checkpoint']}; load "
    f"average {report['loadavg_start'][0]:.2f} at start, "
    f"{report['loadavg_end'][0]:.2f} at the end (the machine is shared with "
    f"other work: timings are noisy). `{report['command']}` "
    f"({report['total_s']:.0f} s).",
    "",
    f"**Accuracy**: a random walk with drift ({length} steps, {dim} values), "
    "profiles 0.05 and 0.10; relative L2 error of the reconstruction at the "
    "last step against the exact power EMA of the walk.",
    "",
    # Two tables, the solver and the errors, so that each fits a page.
    "| snapshots | target sigma_rel | fit error | max abs coefficient "
    "difference vs EDM2 |",
    "|---|---|---|---|",
  ]
  for r in report["accuracy"]:
    lines.append(
      f"| {r['snapshots']} | {r['target']:.2f} | {r['fit_error']:.1e} | "
      f"{r['max_coefficient_difference']:.0e} |"
    )
  lines += [
    "",
    "| snapshots | target sigma_rel | optax_ema, fp16 snapshots | EDM2 solver "
    "(NumPy, float64), same snapshots | unnormalised (0.1.0), same snapshots "
    "| optax_ema, fp32 snapshots |",
    "|---|---|---|---|---|---|",
  ]
  for r in report["accuracy"]:
    lines.append(
      f"| {r['snapshots']} | {r['target']:.2f} | {r['ours_fp16']:.2e} | "
      f"{r['edm2_fp16']:.2e} | {r['unnormalised_fp16']:.2e} | "
      f"{r['ours_fp32']:.2e} |"
    )
  return lines


def _markdown_memory(mem: dict) -> list[str]:
  """The memory and time table, and the bounds it holds."""
  lines = [
    "",
    f"**Memory and time**: {mem['params']:,} float32 parameters in "
    f"{mem['leaves']} leaves, {mem['snapshots']} snapshots x {mem['profiles']} "
    f"profiles in float16 ({mem['bytes_written'] / 1e9:.2f} GB written in "
    f"{mem['write_s']:.1f} s); sigma_rel {TARGET} reconstructed on "
    f"{mem['rows'][0]['devices']} CPU devices.",
    "",
    "| path | malloc | snapshots used | wall s | peak RSS over base MiB | peak "
    "live jax.Array MiB | max abs error vs float64 |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in mem["rows"]:
    err = r.get("max_abs_error_vs_float64")
    lines.append(
      f"| {r['mode']} | {r['allocator']} | {r['step'] // 1000} | {r['wall_s']:.1f} | "
      f"{r['peak_rss_over_base_mib']:.0f} | {r['peak_live_arrays_mib']:.0f} | "
      f"{'' if err is None else f'{err:.1e}'} |"
    )
  lines += [
    "",
    f"Bounds, checked with the {BOUNDED} (under glibc's default, RSS also counts "
    "freed memory the allocator keeps):",
    "",
    "| bound | measured MiB | holds |",
    "|---|---|---|",
  ]
  for c in mem["checks"]:
    lines.append(f"| {c['check']} | {c['value']:.0f} | {'yes' if c['ok'] else 'NO'} |")
  return lines


def render_markdown(report: dict) -> str:
  lines = _markdown_accuracy(report) + _markdown_memory(report["memory"])
  return "\n".join(lines) + "\n"


def run(config: str, command: str) -> dict:
  start = time.perf_counter()
  loadavg_start = os.getloadavg()
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_posthoc_", dir="/tmp"))
  try:
    accuracy = run_accuracy(config, root)
    memory = run_memory(config, root)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return {
    "config": config,
    "command": command,
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": machine(),
    "loadavg_start": loadavg_start,
    "loadavg_end": os.getloadavg(),
    "total_s": time.perf_counter() - start,
    "accuracy": accuracy,
    "memory": memory,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small configuration")
  parser.add_argument("--out", default=None, help="JSON path (.txt, .md beside)")
  parser.add_argument("--_worker", dest="worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(json.loads(args.worker))
    return
  config = "quick" if args.quick else "full"
  default = RESULTS if config == "full" else pathlib.Path(tempfile.gettempdir())
  out = pathlib.Path(args.out or default / "bench_posthoc.json")
  command = "python benchmarks/bench_posthoc.py" + (" --quick" if args.quick else "")
  report = run(config, command)
  markdown = render_markdown(report)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1) + "\n")
  out.with_suffix(".md").write_text(markdown)
  out.with_suffix(".txt").write_text(markdown.replace("**", ""))
  print(markdown)
  failed = [c["check"] for c in report["memory"]["checks"] if not c["ok"]]
  if failed:
    raise SystemExit(f"memory bounds exceeded: {failed}")


if __name__ == "__main__":
  main()
