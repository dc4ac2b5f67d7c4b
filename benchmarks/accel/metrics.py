"""What a compiled program says about memory, traffic and communication.

Definitions (per chip: XLA compiles one SPMD program for every device):

- ``device_peak``: argument + output - alias + temporary bytes in device
  memory (``memory_analysis()``); ``xla_peak``: XLA's own
  ``peak_memory_in_bytes``, reported beside it;
- ``host_bytes``: the host-memory argument + output - alias + temporary bytes;
- ``bytes_accessed``: ``cost_analysis()["bytes accessed"]`` (TPU and CPU;
  the deviceless GPU compiler gives none);
- ``fusions``: kFusion instructions in the entry computation, and in the
  largest branch of each conditional (the averaging branch);
- ``collectives``: collective instructions by kind in the whole module (an
  asynchronous pair counts once, by its ``-start``);
- ``conditionals`` / ``loops``: ``conditional`` and ``while`` instructions;
- ``host_transfers``: ``copy-start`` instructions with an operand or result
  in host memory (memory space 5), not memory-space prefetches.
"""

from __future__ import annotations

import re
from typing import Any

_HOST_SPACE = "S(5)"
_COLLECTIVES = (
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "collective-broadcast",
  "ragged-all-to-all",
)
_WORD = re.compile(r"\s*([a-z][a-z0-9-]*)\(")


def computations(hlo: str) -> dict[str, list[str]]:
  """The module's computations: name -> instruction lines (``ENTRY`` too)."""
  out: dict[str, list[str]] = {}
  name = None
  for line in hlo.splitlines():
    stripped = line.strip()
    if name is None:
      if (
        stripped.endswith("{")
        and "(" in stripped
        and not stripped.startswith("HloModule")
      ):
        head = stripped.split("(")[0].split()
        if head and head[0] == "ENTRY":
          name = "ENTRY"
        elif head:
          name = head[0].lstrip("%")
        if name is not None:
          out[name] = []
    elif stripped == "}":
      name = None
    elif stripped:
      out[name].append(stripped)
  return out


def opcode(line: str) -> str | None:
  """The opcode of an instruction line ``[ROOT] %name = shape opcode(...)``."""
  at = line.find(" = ")
  if at < 0:
    return None
  i = at + 3
  if line.startswith("(", i):  # a tuple shape: skip its balanced parentheses
    depth = 0
    for j in range(i, len(line)):
      depth += {"(": 1, ")": -1}.get(line[j], 0)
      if depth == 0:
        i = j + 1
        break
  else:
    space = line.find(" ", i)
    i = len(line) if space < 0 else space
  match = _WORD.match(line, i)
  return match.group(1) if match else None


def _count(lines: list[str], op: str) -> int:
  return sum(1 for line in lines if opcode(line) == op)


def _called(line: str, key: str) -> list[str]:
  match = re.search(key + r"=\{([^}]*)\}", line)
  if match:
    return [c.strip().lstrip("%") for c in match.group(1).split(",")]
  match = re.search(key + r"=(%?[\w.-]+)", line)
  return [match.group(1).lstrip("%")] if match else []


def hlo_summary(hlo: str) -> dict[str, Any]:
  comps = computations(hlo)
  entry = comps.get("ENTRY", [])
  every = [line for lines in comps.values() for line in lines]
  collectives: dict[str, int] = {}
  for line in every:
    op = opcode(line) or ""
    kind = op.removesuffix("-start")
    if kind in _COLLECTIVES and not op.endswith("-done"):
      collectives[kind] = collectives.get(kind, 0) + 1
  branches = []
  for line in every:
    if opcode(line) != "conditional":
      continue
    names = _called(line, "branch_computations") or (
      _called(line, "false_computation") + _called(line, "true_computation")
    )
    branches.append([_count(comps.get(n, []), "fusion") for n in names])
  host_transfers = sum(
    1 for line in every if opcode(line) == "copy-start" and _HOST_SPACE in line
  )
  return {
    "fusions_entry": _count(entry, "fusion"),
    "fusions_branches": branches,
    "fusions_averaging_branch": max((max(b) for b in branches if b), default=0),
    "collectives": dict(sorted(collectives.items())),
    "conditionals": _count(every, "conditional"),
    "loops": _count(every, "while"),
    "host_transfers": host_transfers,
    "host_memory_in_hlo": _HOST_SPACE in hlo,
  }


def _cost(compiled: Any) -> dict[str, Any]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # the deviceless GPU compiler has none
    return {}
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  return cost or {}


def summary(compiled: Any) -> dict[str, Any]:
  """The figures of a compiled program, as defined above (bytes per chip)."""
  m = compiled.memory_analysis()
  cost = _cost(compiled)
  accessed = cost.get("bytes accessed")
  out = {
    "argument": m.argument_size_in_bytes,
    "output": m.output_size_in_bytes,
    "alias": m.alias_size_in_bytes,
    "temp": m.temp_size_in_bytes,
    "device_peak": (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
    ),
    "xla_peak": getattr(m, "peak_memory_in_bytes", None),
    "host_bytes": (
      m.host_argument_size_in_bytes
      + m.host_output_size_in_bytes
      - m.host_alias_size_in_bytes
      + m.host_temp_size_in_bytes
    ),
    "host_temp": m.host_temp_size_in_bytes,
    "bytes_accessed": None if accessed is None else float(accessed),
    "flops": cost.get("flops"),
  }
  out.update(hlo_summary(compiled.as_text()))
  return out
