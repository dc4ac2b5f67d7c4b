"""The report: the machine, the performance targets, the text and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax
import numpy as np
import optax

import optax_ema

from .runner import Row
from .settings import ADAM
from .settings import OFFLOAD
from .settings import OFFLOAD_EVERY
from .settings import OURS
from .settings import OURS_EVERY


def machine_info() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gb = None
  try:
    with open("/proc/meminfo") as f:
      mem_gb = round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    pass
  versions = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
  }
  versions["optax_ema"] = optax_ema.__version__
  versions["numpy"] = np.__version__
  for name in ("flax", "keras"):
    try:
      versions[name] = __import__(name).__version__
    except ImportError:
      versions[name] = None
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "memory_gb": mem_gb,
    "platform": platform.platform(),
    "device": str(jax.devices()[0]),
    "loadavg_at_start": os.getloadavg(),
    "versions": versions,
  }


def build_table(report: dict[str, Any]) -> str:
  lines = []
  for size, block in report["sizes"].items():
    n = block["num_params"]
    floor = block["floor_ms"]
    lines.append(
      f"\n{size}: {n:,} float32 params in {block['num_leaves']} leaves "
      f"({4 * n / 2**20:.0f} MiB); floor {floor:.3f} ms "
      f"({12 * n / floor / 1e6:.1f} GB/s at 12 B/param); STREAM scale "
      f"{block['scale_gbs']:.1f} GB/s, triad {block['triad_gbs']:.1f} GB/s"
    )
    header = (
      f"{'row':46s} {'ms/step [p25-p75]':>22s} {'EMA ms':>8s} {'/floor':>7s} "
      f"{'RSS MiB':>8s} {'XLA arg/out/alias/temp MiB':>27s} {'kern':>5s}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for name, r in block["rows"].items():
      t = f"{r['median_ms']:.3f} [{r['p25_ms']:.3f}-{r['p75_ms']:.3f}]"
      over = r.get("overhead_ms")
      over_s = f"{over:+.3f}" if over is not None else ""
      ratio = f"{r['overhead_over_floor']:.2f}x" if over is not None else ""
      mem = r.get("memory") or {}
      rss = f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-"
      xla = mem.get("xla")
      if xla:
        tot = {k: sum(x[k] for x in xla) / 2**20 for k in xla[0] if k != "fusions"}
        xla_s = (
          f"{tot['argument_bytes']:.1f}/{tot['output_bytes']:.1f}/"
          f"{tot['alias_bytes']:.1f}/{tot['temp_bytes']:.1f}"
        )
        kern = str(sum(x["fusions"] for x in xla))
      else:
        xla_s, kern = "-", "-"
      flags = ""
      if r["traces_after_warmup"]:
        flags += " RETRACED"
      if r["dispatches_per_step"] > 1:
        flags += f" ({r['dispatches_per_step']} calls)"
      cells = f"{t:>22s} {over_s:>8s} {ratio:>7s} {rss:>8s} {xla_s:>27s} {kern:>5s}"
      lines.append(f"{name + flags:46s} {cells}")
  return "\n".join(lines)


def build_markdown(report: dict[str, Any]) -> str:
  """The run as Markdown: the README's performance table and target verdicts."""
  m = report["machine"]
  out = [
    f"Run {report['date_utc']} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB, "
    f"{m['device']}), jax {m['versions']['jax']}, optax {m['versions']['optax']}, "
    f"flax {m['versions']['flax']}, keras {m['versions']['keras']}; load average "
    f"at start {m['loadavg_at_start'][0]:.2f}; `{report['command']}` "
    f"({report['wall_s']:.0f} s).",
  ]
  for size, block in report["sizes"].items():
    n = block["num_params"]
    out += [
      "",
      f"**{size}**: {n:,} float32 parameters in {block['num_leaves']} leaves; "
      f"floor {block['floor_ms']:.3f} ms ({12 * n / block['floor_ms'] / 1e6:.1f} GB/s "
      f"at 12 B/param); STREAM-like scale {block['scale_gbs']:.1f} GB/s, triad "
      f"{block['triad_gbs']:.1f} GB/s.",
      "",
      "| row | ms/step, median [p25-p75] | EMA overhead ms | overhead / floor "
      "| peak RSS MiB | XLA arg / out / alias / temp MiB | loops |",
      "|---|---|---|---|---|---|---|",
    ]
    for name, r in block["rows"].items():
      over = r.get("overhead_ms")
      mem = r.get("memory") or {}
      xla = mem.get("xla") or []
      tot = {
        k: sum(x[k] for x in xla) / 2**20
        for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
      }
      xla_s = (
        "{argument_bytes:.1f} / {output_bytes:.1f} / {alias_bytes:.1f} / "
        "{temp_bytes:.1f}".format(**tot)
        if xla
        else "-"
      )
      calls = r["dispatches_per_step"]
      cells = [
        name + (f" ({calls} calls)" if calls > 1 else ""),
        f"{r['median_ms']:.3f} [{r['p25_ms']:.3f}-{r['p75_ms']:.3f}]",
        "" if over is None else f"{over:+.3f}",
        "" if over is None else f"{r['overhead_over_floor']:.2f}x",
        f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-",
        xla_s,
        str(sum(x["fusions"] for x in xla)) if xla else "-",
      ]
      out.append("| " + " | ".join(cells) + " |")
  out += ["", "Targets: `" + json.dumps(report["targets"]) + "`"]
  return "\n".join(out) + "\n"


def targets(report: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
  """The performance targets, evaluated on this run (None where a row is missing)."""
  sizes = report["sizes"]
  largest = max(sizes, key=lambda k: sizes[k]["num_params"])
  big = sizes[largest]["rows"]
  out: dict[str, Any] = {"largest_size": largest}

  def get(size: str, name: str, key: str) -> Any:
    return sizes[size]["rows"].get(name, {}).get(key)

  ours = get(largest, OURS, "overhead_over_floor")
  out["overhead_over_floor_at_largest"] = ours
  out["overhead_over_floor_le_1.05"] = None if ours is None else ours <= 1.05
  others = {
    r.name: big[r.name]["overhead_over_floor"]
    for r in rows
    if r.name in big
    and "overhead_over_floor" in big[r.name]
    and r.name != OURS
    and r.group != "offload"
    and "update_every" not in r.name
    and "decays" not in r.name
  }
  out["other_overheads_over_floor_at_largest"] = others
  if others and ours is not None:
    out["no_worse_than_best_other"] = ours <= min(others.values())
  if "1M" in sizes:
    over = get("1M", OURS, "overhead_ms")
    out["overhead_ms_at_1M"] = over
    out["overhead_le_0.25ms_at_1M"] = None if over is None else over <= 0.25
  every = get(largest, OURS_EVERY, "overhead_over_floor")
  out["update_every_overhead_over_floor"] = every
  out["update_every_le_0.15"] = None if every is None else every <= 0.15
  for name in (OFFLOAD, OFFLOAD_EVERY):  # on CPU host and device are one RAM
    out[f"{name} overhead_over_floor"] = get(largest, name, "overhead_over_floor")
  out["retraces_after_first_step"] = {
    size: sum(r["traces_after_warmup"] for r in block["rows"].values())
    for size, block in sizes.items()
  }
  out["dispatches_per_step_ours"] = get(largest, OURS, "dispatches_per_step")
  mem_ours = (big.get(OURS) or {}).get("memory", {})
  mem_adam = (big.get(ADAM) or {}).get("memory", {})
  param_bytes = sizes[largest]["param_bytes"]
  if "peak_rss_mb" in mem_ours and "peak_rss_mb" in mem_adam:
    extra = (mem_ours["peak_rss_mb"] - mem_adam["peak_rss_mb"]) * 2**20 / param_bytes
    out["extra_peak_rss_over_param_bytes"] = extra
    out["extra_peak_rss_le_1.05"] = extra <= 1.05
  if mem_ours.get("xla") and mem_adam.get("xla"):
    out["extra_xla_argument_over_param_bytes"] = (
      mem_ours["xla"][0]["argument_bytes"] - mem_adam["xla"][0]["argument_bytes"]
    ) / param_bytes
    out["xla_temp_bytes_ours"] = mem_ours["xla"][0]["temp_bytes"]
    out["kernels_adam_vs_ours"] = [
      mem_adam["xla"][0]["fusions"],
      mem_ours["xla"][0]["fusions"],
    ]
  return out
