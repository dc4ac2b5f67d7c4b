"""What a compiled step says: XLA's memory analysis and its array-sized loops."""

from __future__ import annotations

from typing import Any


def memory_stats(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  out = {
    "argument_bytes": int(stats.argument_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "alias_bytes": int(stats.alias_size_in_bytes),
    "temp_bytes": int(stats.temp_size_in_bytes),
    "fusions": count_fusions(compiled.as_text()),
  }
  for field in ("host_argument", "host_output", "host_alias", "host_temp"):
    value = getattr(stats, f"{field}_size_in_bytes", None)
    if value is not None:
      out[f"{field}_bytes"] = int(value)
  return out


def count_fusions(hlo: str) -> int:
  """Array-sized fused loops the entry computation runs (scalar ones left out).

  Each such kernel is one pass over memory; on CPU, XLA emits one per output
  array (it does not fuse siblings into multi-output loops).
  """
  entry = hlo[hlo.find("ENTRY") :]
  entry = entry[: entry.find("\n}")]
  count = 0
  for line in entry.splitlines():
    if " fusion(" not in line or " = " not in line:
      continue
    result_type = line.split(" = ", 1)[1].split(" fusion(", 1)[0]
    if any(dims not in ("", "1") for dims in _dims(result_type)):
      count += 1
  return count


def _dims(result_type: str) -> list[str]:
  """The bracketed dimension lists of an HLO type, e.g. ``f32[4,2]{1,0}``."""
  out, rest = [], result_type
  while "[" in rest:
    rest = rest.split("[", 1)[1]
    out.append(rest.split("]", 1)[0])
  return out
