"""The command line: ``python benchmarks/bench_ema.py [flags]``."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .check import check_row
from .memory import measure_memory
from .memory import memory_child
from .report import build_markdown
from .report import build_table
from .report import machine_info
from .report import targets
from .rows import all_rows
from .runner import Row
from .settings import DECAY
from .settings import DECAYS
from .settings import FLOOR
from .settings import LEARNING_RATE
from .settings import RESULTS
from .settings import SCALE
from .settings import SCRIPT
from .settings import TRIAD
from .settings import UPDATE_EVERY
from .timing import summarize
from .timing import time_rows
from .trees import SIZES
from .trees import num_leaves
from .trees import num_params

DESCRIPTION = (
  "The cost of averaging parameters: optax_ema against every peer and the floor."
)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _chosen_rows(args: argparse.Namespace) -> list[Row]:
  """The rows ``--rows`` names (by name or group), with the floor rows."""
  rows = all_rows()
  if not args.rows:
    return rows
  wanted = set(args.rows.split(","))
  return [r for r in rows if r.name in wanted or r.group in wanted or r.kind != "step"]


def _new_report(args: argparse.Namespace) -> dict[str, Any]:
  return {
    "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join([os.path.relpath(SCRIPT), *sys.argv[1:]]),
    "machine": machine_info(),
    "config": {
      "learning_rate": LEARNING_RATE,
      "decay": DECAY,
      "decays": DECAYS,
      "update_every": UPDATE_EVERY,
      "rounds": args.rounds,
      "steps": args.steps,
      "sizes": args.sizes,
    },
    "sizes": {},
  }


def _size_lists(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
  """The sizes to time, to measure peak RSS at, and to check rows at."""
  sizes = args.sizes.split(",")
  memory_sizes = (
    args.memory_sizes.split(",") if args.memory_sizes else [max(sizes, key=num_params)]
  )
  if args.check_sizes == "all":
    check_sizes = sizes
  else:
    check_sizes = (
      args.check_sizes.split(",") if args.check_sizes else [min(sizes, key=num_params)]
    )
  return sizes, memory_sizes, check_sizes


def _prepare(
  rows: list[Row], size: str, check: bool
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
  """Each row's runner, its NumPy check (if ``check``) and its XLA figures."""
  runners = {row.name: row.make(size) for row in rows}
  checks, xla = [], {}
  for row in rows:
    if check:
      checks.append(check_row(row, size, runner=runners[row.name]))
    state = runners[row.name].init()
    xla[row.name] = runners[row.name].memory(state)
    del state
  return runners, checks, xla


def _add_overheads(block: dict[str, Any], rows: list[Row], n: int) -> None:
  """The floor, the bandwidths, and each row's overhead over its baseline."""
  floor = block["rows"][FLOOR]["median_ms"]
  block["floor_ms"] = floor
  block["scale_gbs"] = 8 * n / block["rows"][SCALE]["median_ms"] / 1e6
  block["triad_gbs"] = 12 * n / block["rows"][TRIAD]["median_ms"] / 1e6
  names = {r.name for r in rows}
  for row in rows:
    r = block["rows"][row.name]
    if row.baseline is not None and row.baseline in names:
      over = r["median_ms"] - block["rows"][row.baseline]["median_ms"]
      r["overhead_ms"] = over
      r["overhead_over_floor"] = over / floor


def _run_size(
  args: argparse.Namespace,
  rows: list[Row],
  size: str,
  check_sizes: list[str],
  rss: dict[str, Any],
  elapsed: Callable[[], float],
) -> dict[str, Any]:
  """One size: checks, XLA figures, interleaved timing; its block of the report."""
  n = num_params(size)
  what = f"checking {len(rows)} rows" if size in check_sizes else "compiling"
  _log(f"{size}: {n:,} params in {num_leaves(size)} leaves; {what}")
  runners, checks, xla = _prepare(rows, size, size in check_sizes)
  _log(f"  {size}: ready ({elapsed():.0f} s)")
  steps = args.steps if args.steps else max(5, min(100, int(1e8 / n)))
  timed = time_rows(rows, runners, size, args.rounds, steps, _log)
  block: dict[str, Any] = {
    "num_params": n,
    "num_leaves": num_leaves(size),
    "param_bytes": 4 * n,
    "steps_per_round": steps,
    "checks": checks,
    "rows": {},
  }
  for row in rows:
    r = {**summarize(timed[row.name]["samples_ms"]), **timed[row.name]}
    child = rss.get(row.name, {}).get(size, {})
    r["memory"] = {
      "xla": xla[row.name],
      **{k: v for k, v in child.items() if k != "xla"},
    }
    block["rows"][row.name] = r
  _add_overheads(block, rows, n)
  return block


def run(args: argparse.Namespace) -> dict[str, Any]:
  """The whole run: peak RSS per row, then every size; the report."""
  started = time.perf_counter()
  elapsed = lambda: time.perf_counter() - started
  rows = _chosen_rows(args)
  report = _new_report(args)
  sizes, memory_sizes, check_sizes = _size_lists(args)
  report["config"]["check_sizes"] = check_sizes
  report["config"]["memory_sizes"] = memory_sizes
  rss: dict[str, Any] = {}
  if not args.no_memory:
    for row in rows:
      rss[row.name] = measure_memory(row, memory_sizes)
    _log(f"peak RSS measured in {len(rows)} fresh processes ({elapsed():.0f} s)")
  for size in sizes:
    report["sizes"][size] = _run_size(args, rows, size, check_sizes, rss, elapsed)
    gc.collect()
  report["targets"] = targets(report, rows)
  report["wall_s"] = elapsed()
  return report


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  parser.add_argument(
    "--sizes", default="1M,16M,64M", help=f"comma-separated, of {list(SIZES)}"
  )
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument(
    "--steps", type=int, default=0, help="timed steps per row per round (0: by size)"
  )
  parser.add_argument("--rows", default="", help="comma-separated row names or groups")
  parser.add_argument(
    "--no-memory", action="store_true", help="skip the subprocess memory runs"
  )
  parser.add_argument(
    "--check-sizes",
    default="",
    help="sizes at which every row is checked against NumPy first (default: the "
    "smallest; 'all' for every size)",
  )
  parser.add_argument(
    "--memory-sizes",
    default="",
    help="sizes for the peak-RSS subprocesses (default: the largest)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="smoke configuration: 64K, 2x5 steps"
  )
  parser.add_argument("--out", default=os.path.join(RESULTS, "bench_ema.json"))
  parser.add_argument(
    "--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS
  )
  return parser


def _write(report: dict[str, Any], text: str, out: str) -> None:
  """The JSON, the printed text (``.txt``) and the Markdown tables (``.md``)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.splitext(out)[0] + ".txt", "w") as f:
    f.write(text + "\n")
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(build_markdown(report))


def _heading(report: dict[str, Any]) -> str:
  m = report["machine"]
  return (
    f"optax_ema benchmark, {report['date_utc']}, {m['cpu']} ({m['cores']} cores, "
    f"{m['memory_gb']} GB), jax {m['versions']['jax']}, load at start "
    f"{m['loadavg_at_start'][0]:.2f}\ncommand: {report['command']}; "
    f"wall {report['wall_s']:.0f} s"
  )


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  if args.memory_child:
    print(json.dumps(memory_child(args.memory_child, args.sizes.split(","))))
    return
  if args.quick:
    args.sizes, args.rounds, args.steps = "64K", 2, 5
  report = run(args)
  table = build_table(report)
  table += "\n\ntargets: " + json.dumps(report["targets"], indent=1)
  text = _heading(report) + table
  print(text)
  if args.out:
    _write(report, text, args.out)
