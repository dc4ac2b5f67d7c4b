"""Peak memory: a fresh process per row, its peak RSS after init and 3 steps."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from typing import Any

from .rows import all_rows
from .runner import Row
from .runner import block
from .settings import SCRIPT
from .trees import num_params


def _proc_status_mb(field: str) -> float:
  """VmHWM / VmRSS of this process in MiB (VmHWM, unlike ru_maxrss, starts
  afresh at exec, so a child does not inherit its parent's peak)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(row_name: str, sizes: list[str]) -> dict[str, Any]:
  """In a fresh process: peak RSS after init and 3 steps.

  Sizes run in increasing order, so the process peak after each size is that
  size's peak.
  """
  row = {r.name: r for r in all_rows()}[row_name]
  out = {}
  for size in sorted(sizes, key=num_params):
    runner = row.make(size)
    before = _proc_status_mb("VmRSS")
    state = runner.init()
    for _ in range(3):
      state = runner.step(state)
    block(state)
    out[size] = {"peak_rss_mb": _proc_status_mb("VmHWM"), "rss_before_init_mb": before}
    del state, runner
    gc.collect()
  return out


def measure_memory(
  row: Row, sizes: list[str], timeout: float = 300.0
) -> dict[str, Any]:
  """Runs :func:`memory_child` for ``row`` in a fresh Python process."""
  cmd = [
    sys.executable,
    SCRIPT,
    "--_memory-child",
    row.name,
    "--sizes",
    ",".join(sizes),
  ]
  out = subprocess.run(
    cmd, capture_output=True, text=True, timeout=timeout, check=False
  )
  if out.returncode != 0:
    raise RuntimeError(f"memory run of {row.name!r} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])
