"""The harness's command line (see ``__main__``)."""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

import jax

from . import limits
from . import matrix
from . import recipe
from . import rows
from . import tables
from . import targets


def _write(path: str, report: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, path)


def _new_report(name: str) -> dict[str, Any]:
  return {
    "matrix": name,
    "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "versions": targets.versions(),
    "machine": {
      "python": sys.version.split()[0],
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
    },
    "results": [],
    "errors": [],
  }


def _resumed(report: dict[str, Any], out: str) -> set[str]:
  """Takes the results of ``<out>.json`` into ``report``; the keys of their jobs."""
  with open(out + ".json") as f:
    old = json.load(f)
  report["results"] = old["results"]
  fields = ("target", "model", "program", "layout", "sharding", "row")
  return {matrix.Job(**{k: r[k] for k in fields}).key for r in old["results"]}


def _finish(report: dict[str, Any], out: str) -> None:
  """The ratios, then ``<out>.json``, ``.md`` (the tables) and ``.txt``."""
  matrix.ratios(report["results"])
  _write(out + ".json", report)
  with open(out + ".md", "w") as f:
    f.write(tables.markdown(report))
  with open(out + ".txt", "w") as f:
    f.write("\n".join(tables.line(r) for r in report["results"]) + "\n")


def run(
  name: str,
  out: str,
  only: str = "",
  resume: bool = False,
  platform_name: str = "",
  quiet: bool = False,
) -> dict[str, Any]:
  """Compile the jobs of matrix ``name`` whose key contains ``only``."""
  jobs = [j for j in matrix.plan(name) if only in j.key]
  if platform_name:
    jobs = [j for j in jobs if targets.TARGETS[j.target].platform == platform_name]
  report = _new_report(name)
  done: set[str] = set()
  if resume and os.path.exists(out + ".json"):
    done = _resumed(report, out)
  t0 = time.perf_counter()
  for i, job in enumerate(jobs):
    if job.key in done:
      continue
    start = time.perf_counter()
    try:
      result = matrix.compile_job(job)
    except Exception as e:  # recorded, and the run goes on
      report["errors"].append(
        {"job": job.key, "error": f"{type(e).__name__}: {e}"[:2000]}
      )
      if not quiet:
        traceback.print_exc()
      continue
    result["wall_s"] = time.perf_counter() - start
    report["results"].append(result)
    report["elapsed_s"] = time.perf_counter() - t0
    _write(out + ".json", report)
    if not quiet:
      print(
        f"[{i + 1}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {tables.line(result)}",
        flush=True,
      )
  report["elapsed_s"] = time.perf_counter() - t0
  _finish(report, out)
  return report


def merge(results_dir: str) -> None:
  """Join the parts of a full run (``accel_full_<platform>_*.json``) into one.

  A run split over several processes (``--only``, ``--out``) writes one
  file per part; this keeps each job once, in the full matrix's order, in
  ``accel_full_<platform>.json`` with its ``.md`` and ``.txt``, and removes
  the parts.
  """
  order = {job.key: i for i, job in enumerate(matrix.plan("full"))}
  for platform_name in ("tpu", "cuda"):
    paths = sorted(
      glob.glob(os.path.join(results_dir, f"accel_full_{platform_name}*.json"))
    )
    if not paths:
      continue
    report: dict[str, Any] = {}
    found: dict[str, dict[str, Any]] = {}
    elapsed, errors, parts = 0.0, {}, {}
    for path in paths:
      with open(path) as f:
        part = json.load(f)
      report = report or part
      elapsed += part.get("elapsed_s", 0.0)  # parts may have run side by side
      errors.update((e["job"], e) for e in part.get("errors", []))
      parts.update(dict.fromkeys(part.get("parts", [os.path.basename(path)])))
      for r in part["results"]:  # a later part's rerun replaces a job
        found[_key(r)] = r
    report["elapsed_s"] = elapsed
    report["errors"] = [e for k, e in errors.items() if k not in found]
    report["parts"] = list(parts)  # of an earlier merge too
    report["results"] = sorted(found.values(), key=lambda r: order.get(_key(r), 1e9))
    report["not_run"] = [
      k for k in order if k not in found and platform_name in _platforms(k)
    ]
    matrix.ratios(report["results"])
    out = os.path.join(results_dir, f"accel_full_{platform_name}")
    _write(out + ".json", report)
    with open(out + ".md", "w") as f:
      f.write(tables.markdown(report))
    with open(out + ".txt", "w") as f:
      f.write("\n".join(tables.line(r) for r in report["results"]) + "\n")
    for path in paths:
      if path != out + ".json":
        for suffix in (".json", ".md", ".txt"):
          if os.path.exists(path[: -len(".json")] + suffix):
            os.remove(path[: -len(".json")] + suffix)


def _key(r: dict[str, Any]) -> str:
  return matrix.Job(**{k: r[k] for k in (*tables.CONFIG, "row")}).key


def _platforms(key: str) -> str:
  return targets.TARGETS[key.split(" | ")[0]].platform


def write_docs(results_dir: str) -> None:
  """``accel_docs.md`` from the full run's JSON files (``accel_full_*.json``).

  With the figures of the engine before its accelerator changes beside them
  where ``accel_before_*.json`` (an earlier full run, kept) exist.
  """
  results: list[dict[str, Any]] = []
  found: dict[str, dict[str, Any]] = {}
  paths = glob.glob(os.path.join(results_dir, "accel_full_*.json"))
  for path in sorted(paths, key=os.path.getmtime):
    with open(path) as f:
      for r in json.load(f)["results"]:  # a later file's rerun replaces a job
        found[_key(r)] = r
  results = list(found.values())
  matrix.ratios(results)
  text = tables.docs(results, list(rows.ROWS), rows.MAIN)
  before: list[dict[str, Any]] = []
  for path in sorted(glob.glob(os.path.join(results_dir, "accel_before_*.json"))):
    with open(path) as f:
      before += json.load(f)["results"]
  if before:
    matrix.ratios(before)
    text += (
      "\n**Before and after the engine's accelerator changes** (optimizer"
      " step alone, 1B, stacked layers, FSDP; device temporaries over the"
      " baseline, x P, and the bytes accessed of the averaging / skip"
      " branch after):\n\n"
      + tables.before_after(before, results, list(rows.ROWS))
      + "\n"
    )
  with open(os.path.join(results_dir, "accel_docs.md"), "w") as f:
    f.write(text)
  print(text)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description="Compile-only analysis for TPU pods and GPUs."
  )
  parser.add_argument(
    "--matrix", default="quick", choices=("full", "quick", "cpu", "dry-run")
  )
  parser.add_argument(
    "--only", default="", help="run the jobs whose key holds this text"
  )
  parser.add_argument(
    "--out",
    default="",
    help="output prefix (default benchmarks/results/accel_<matrix>)",
  )
  parser.add_argument(
    "--platform",
    default="",
    choices=("", "tpu", "cuda", "cpu"),
    help="only its targets",
  )
  parser.add_argument(
    "--resume", action="store_true", help="skip the jobs already in <out>.json"
  )
  parser.add_argument(
    "--docs",
    action="store_true",
    help="write the guide's tables (accel_docs.md) from the full run's JSON files",
  )
  parser.add_argument(
    "--merge",
    action="store_true",
    help="join the parts of a full run split by --only and --out",
  )
  parser.add_argument(
    "--recipe", action="store_true", help="count the sharded-jit recipe's collectives"
  )
  parser.add_argument(
    "--limits",
    action="store_true",
    help="reproduce the XLA:TPU limits without optax_ema (accel_limits.json)",
  )
  parser.add_argument("--list", action="store_true", help="print the jobs and exit")
  return parser


def _side_task(args: argparse.Namespace, results_dir: str) -> bool:
  """Runs ``--merge``, ``--docs``, ``--recipe``, ``--limits`` or ``--list``.

  Returns whether one of them ran (then there is no matrix to compile).
  """
  if args.merge:
    merge(results_dir)
  if args.docs:
    write_docs(results_dir)
  if args.docs or args.merge:
    return True
  if args.recipe:
    found = recipe.collectives()
    report = {"versions": targets.versions(), "collectives": found}
    _write(os.path.join(results_dir, "accel_recipe.json"), report)
    print(json.dumps(found, indent=1))
    return True
  if args.limits:
    report = {"versions": targets.versions(), "temporaries": limits.run()}
    _write(os.path.join(results_dir, "accel_limits.json"), report)
    print(json.dumps(report["temporaries"], indent=1))
    return True
  if args.list:
    for job in matrix.plan(args.matrix):
      if args.only in job.key:
        print(job.key)
    return True
  return False


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  results_dir = os.path.join("benchmarks", "results")
  if _side_task(args, results_dir):
    return
  if args.matrix in ("dry-run", "cpu") and jax.device_count("cpu") < 8:
    raise SystemExit(
      "the cpu targets need 8 CPU devices: set XLA_FLAGS="
      "--xla_force_host_platform_device_count=8"
    )
  out = args.out or os.path.join(
    "benchmarks", "results", f"accel_{args.matrix.replace('-', '_')}"
  )
  if args.platform and not args.out:
    out += f"_{args.platform}"
  report = run(args.matrix, out, args.only, args.resume, platform_name=args.platform)
  print(
    f"{len(report['results'])} jobs in {report['elapsed_s']:.0f}s,"
    f" {len(report['errors'])} errors -> {out}.json/.md/.txt"
  )
