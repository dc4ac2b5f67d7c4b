"""Two versions of optax_ema compiled for TPU and GPU targets in one run.

The compile-only counterpart of ``compare_versions.py``: the accelerator
harness (``python -m benchmarks.accel``) of this checkout compiles the same
jobs once with each version of ``optax_ema``, one after the other, and the
figures that do not depend on load (device and host bytes, temporaries,
fusions, loops, conditionals, host transfers, collectives, traffic) are
compared job by job. Run it in the ``aot`` environment, with another
checkout of the package::

  git worktree add /tmp/optax_ema_old <commit>
  python benchmarks/compare_accel.py --old /tmp/optax_ema_old

Results go to ``benchmarks/results/compare_accel.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# The 1B optimizer steps of the committed full matrix that the library
# compiles differently per option, on one TPU and one GPU target.
JOBS = ["v5e-256 | 1b | opt | scan | fsdp |", "h100x8 | 1b | opt | scan | fsdp |"]
FIGURES = [
  "device_peak",
  "xla_peak",
  "temp",
  "host_bytes",
  "host_temp",
  "bytes_accessed",
  "flops",
  "fusions_entry",
  "fusions_averaging_branch",
  "conditionals",
  "loops",
  "host_transfers",
  "collectives",
]


def _run(version: pathlib.Path, only: str, out: pathlib.Path) -> list[dict[str, Any]]:
  """The harness of this checkout, importing ``optax_ema`` from ``version``."""
  with tempfile.TemporaryDirectory() as stage:
    (pathlib.Path(stage) / "optax_ema").symlink_to(version / "optax_ema")
    (pathlib.Path(stage) / "benchmarks").symlink_to(ROOT / "benchmarks")
    platform = "tpu" if only.startswith("v") else "cuda"
    cmd = [sys.executable, "-m", "benchmarks.accel", "--matrix", "full"]
    cmd += ["--platform", platform, "--only", only, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": stage}
    subprocess.run(cmd, cwd=stage, env=env, check=True)
  return json.loads(out.with_suffix(".json").read_text())["results"]


def compare(old: pathlib.Path, work: pathlib.Path) -> dict[str, Any]:
  report: dict[str, Any] = {
    "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
    "jobs": [],
  }
  for i, only in enumerate(JOBS):
    rows = {
      v: _run(path, only, work / f"{v}{i}") for v, path in (("old", old), ("new", ROOT))
    }
    new = {(r["target"], r["row"]): r for r in rows["new"]}
    for r in rows["old"]:
      n = new.get((r["target"], r["row"]))
      if n is None or "error" in r or "error" in n:
        report["jobs"].append({"target": r["target"], "row": r["row"], "error": True})
        continue
      changed = {f: [r.get(f), n.get(f)] for f in FIGURES if r.get(f) != n.get(f)}
      entry = {"target": r["target"], "row": r["row"], "changed": changed}
      report["jobs"].append(entry)
  return report


def markdown(report: dict[str, Any]) -> str:
  same = sum(1 for j in report["jobs"] if j.get("changed") == {})
  out = [
    f"Run {report['date_utc']}; `{report['command']}`. "
    f"{same} of {len(report['jobs'])} jobs compile to the same figures "
    f"({', '.join(FIGURES)}).",
    "",
    "| target | row | figures that differ (old -> new) |",
    "|---|---|---|",
  ]
  for j in report["jobs"]:
    if j.get("error"):
      what = "not compiled by one version"
    else:
      what = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in j["changed"].items())
    out.append(f"| {j['target']} | {j['row']} | {what or 'none'} |")
  return "\n".join(out) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--old", required=True, help="a checkout of the other version")
  parser.add_argument("--out", default=str(HERE / "results" / "compare_accel.json"))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as work:
    report = compare(pathlib.Path(args.old).resolve(), pathlib.Path(work))
  text = markdown(report)
  print(text)
  pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  pathlib.Path(args.out).with_suffix(".md").write_text(text)


if __name__ == "__main__":
  main()
