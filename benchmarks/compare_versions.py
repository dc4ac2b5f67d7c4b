"""Two versions of optax_ema, timed interleaved in one run, row by row.

Run from the repository root, with another checkout of the package (e.g. a
git worktree of the release before a refactor)::

  git worktree add /tmp/optax_ema_old v0.1.0-commit
  python benchmarks/compare_versions.py --old /tmp/optax_ema_old

Two worker processes import ``benchmarks/bench_ema.py``'s rows, one with each
version of ``optax_ema`` on its path; the driver makes them time one round
each in turn (old, new, new, old, ...), so both see the same machine load,
and collects for every row and size the medians, the array-sized loops the
compiled step runs and XLA's compiled memory analysis. Results go to
``benchmarks/results/compare_versions.{json,md}``. On a shared machine one
round can be 30% faster or slower than the next: compare medians over many
rounds, and the loop counts and memory, which do not depend on load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_ROWS = [
  "optax adam",
  "moving_average(adam)",
  "moving_average(adam, update_every=10)",
  "moving_average(adam, decays=(0.99, 0.999))",
  "optax adam, not donated",
  "moving_average(adam), not donated",
  "optax adam, flat vector",
  "moving_average(adam), flat vector",
]


def worker(size: str, rows: list[str], steps: int) -> None:
  """Builds the rows, reports their compiled form, then times on request."""
  sys.path.insert(0, str(HERE))
  import bench_ema

  import optax_ema

  table = {r.name: r for r in bench_ema.all_rows()}
  chosen = [table[name] for name in rows if name in table]
  runners = {r.name: r.make(size) for r in chosen}
  compiled = {}
  for r in chosen:
    state = runners[r.name].init()
    compiled[r.name] = runners[r.name].memory(state)
    del state
  print(
    json.dumps(
      {"version": optax_ema.__version__, "path": optax_ema.__file__, "xla": compiled}
    ),
    flush=True,
  )
  for line in sys.stdin:
    if line.strip() != "round":
      break
    timed = bench_ema.time_rows(chosen, runners, size, 1, steps, lambda _: None)
    print(json.dumps({k: v["samples_ms"] for k, v in timed.items()}), flush=True)


def _start(path: pathlib.Path, size: str, rows: list[str], steps: int) -> Any:
  env = {**os.environ, "PYTHONPATH": str(path), "PYTHONUNBUFFERED": "1"}
  cmd = [sys.executable, __file__, "--_worker", "--sizes", size, "--steps", str(steps)]
  cmd += ["--rows", ";".join(rows)]  # row names hold commas
  proc = subprocess.Popen(
    cmd,
    env=env,
    cwd=str(ROOT),
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  info = json.loads(proc.stdout.readline())
  return proc, info


def _median(xs: list[float]) -> float:
  ys = sorted(xs)
  n = len(ys)
  return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def compare(args: argparse.Namespace) -> dict[str, Any]:
  import numpy as np

  versions = {"old": pathlib.Path(args.old).resolve(), "new": ROOT}
  report: dict[str, Any] = {
    "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
    "loadavg_at_start": os.getloadavg(),
    "sizes": {},
  }
  for size in args.sizes.split(","):
    steps = args.steps or (20 if size == "64M" else 50)
    procs = {k: _start(p, size, MAIN_ROWS, steps) for k, p in versions.items()}
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in versions}
    try:
      for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for key in order:
          proc = procs[key][0]
          proc.stdin.write("round\n")
          proc.stdin.flush()
          for name, xs in json.loads(proc.stdout.readline()).items():
            samples[key].setdefault(name, []).extend(xs)
        print(f"{size}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    finally:
      for proc, _ in procs.values():
        proc.stdin.close()
        proc.wait(timeout=60)
    block: dict[str, Any] = {}
    for name in MAIN_ROWS:
      entry = {}
      for key in versions:
        info = procs[key][1]
        if name not in samples[key]:
          continue
        xs = samples[key][name]
        xla = info["xla"][name]
        entry[key] = {
          "version": info["version"],
          "median_ms": _median(xs),
          "p25_ms": float(np.percentile(xs, 25)),
          "p75_ms": float(np.percentile(xs, 75)),
          "loops": sum(x["fusions"] for x in xla),
          "xla": xla,
        }
      if "old" in entry and "new" in entry:
        keys = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
        total = {
          v: {k: sum(x[k] for x in entry[v]["xla"]) for k in keys} for v in versions
        }
        entry["memory_new_minus_old"] = {
          k: total["new"][k] - total["old"][k] for k in keys
        }
        entry["same_loops"] = entry["old"]["loops"] == entry["new"]["loops"]
        entry["new_over_old"] = entry["new"]["median_ms"] / entry["old"]["median_ms"]
      block[name] = entry
    report["sizes"][size] = block
  return report


def markdown(report: dict[str, Any]) -> str:
  load = report["loadavg_at_start"][0]
  out = [
    f"Run {report['date_utc']}, load average at start {load:.2f}; "
    f"`{report['command']}`. Medians over interleaved rounds.",
  ]
  for size, block in report["sizes"].items():
    out += [
      "",
      f"**{size}**",
      "",
      "| row | old ms/step [p25-p75] | new ms/step [p25-p75] | new / old "
      "| loops old / new | XLA bytes new - old (arg / out / alias / temp) |",
      "|---|---|---|---|---|---|",
    ]
    for name, e in block.items():
      if "old" not in e or "new" not in e:
        continue
      o, n = e["old"], e["new"]
      out.append(
        f"| {name} | {o['median_ms']:.3f} [{o['p25_ms']:.3f}-{o['p75_ms']:.3f}] "
        f"| {n['median_ms']:.3f} [{n['p25_ms']:.3f}-{n['p75_ms']:.3f}] "
        f"| {e['new_over_old']:.2f} | {o['loops']} / {n['loops']} "
        f"| {' / '.join(f'{v:+d}' for v in e['memory_new_minus_old'].values())} |"
      )
  return "\n".join(out) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--old", help="a checkout of the other optax_ema version")
  parser.add_argument("--sizes", default="16M,64M")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=0)
  parser.add_argument("--rows", default="")
  parser.add_argument("--out", default=str(HERE / "results" / "compare_versions.json"))
  parser.add_argument(
    "--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS
  )
  args = parser.parse_args()
  if args.worker:
    worker(args.sizes, args.rows.split(";"), args.steps)
    return
  if not args.old:
    parser.error("--old is required")
  report = compare(args)
  text = markdown(report)
  print(text)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
