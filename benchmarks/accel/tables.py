"""Tables of the harness's results: one line per job, Markdown per configuration."""

from __future__ import annotations

from typing import Any

_SHORT = {
  "all-gather": "AG",
  "all-reduce": "AR",
  "reduce-scatter": "RS",
  "all-to-all": "A2A",
  "collective-permute": "CP",
  "collective-broadcast": "CB",
  "ragged-all-to-all": "RA2A",
}

CONFIG = ("target", "model", "program", "layout", "sharding")


def collectives(counts: dict[str, int]) -> str:
  return " ".join(f"{_SHORT.get(k, k)}{v}" for k, v in counts.items()) or "0"


def _x(value: Any, signed: bool = False) -> str:
  if value is None:
    return "-"
  return f"{value:+.2f}x" if signed else f"{value:.2f}x"


def _branches(r: dict[str, Any]) -> str:
  avg, skip = r.get("averaging_branch"), r.get("skip_branch")
  if not avg or not skip or not avg["bytes_accessed"]:
    return "-"
  p = r["param_bytes"]
  return f"{avg['bytes_accessed'] / p:.1f} / {skip['bytes_accessed'] / p:.1f}"


def line(r: dict[str, Any]) -> str:
  """One job: its configuration and main figures (bytes over param bytes)."""
  p = r["param_bytes"]
  accessed = "-" if not r["bytes_accessed"] else f"{r['bytes_accessed'] / p:.2f}"
  return (
    " | ".join(str(r[k]) for k in (*CONFIG, "row"))
    + f" :: peak {r['device_peak'] / p:.2f}x temp {r['temp'] / p:.2f}x"
    f" host {r['host_bytes'] / p:.2f}x accessed {accessed}x"
    f" fusions {r['fusions_entry']}/{r['fusions_averaging_branch']}"
    f" coll {collectives(r['collectives'])} cond {r['conditionals']}"
    f" loops {r['loops']} h2d {r['host_transfers']} compile {r['compile_s']:.1f}s"
  )


def groups(
  results: list[dict[str, Any]],
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
  out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for r in results:
    out.setdefault(tuple(r[k] for k in CONFIG), []).append(r)
  return out


def memory_table(rows: list[dict[str, Any]]) -> str:
  lines = [
    "| row | device peak | peak vs base | temp vs base | host | compile |",
    "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    lines.append(
      f"| {r['row']} | {_x(r.get('peak_x'))} | {_x(r.get('d_peak'), True)}"
      f" | {_x(r.get('d_temp'), True)} | {_x(r.get('host_x'))}"
      f" | {r['compile_s']:.0f} s |"
    )
  return "\n".join(lines)


def structure_table(rows: list[dict[str, Any]]) -> str:
  lines = [
    "| row | bytes vs hand-fused | avg / skip branch | fusions | collectives"
    " | cond / loop / host copy |",
    "| --- | ---: | ---: | ---: | --- | ---: |",
  ]
  for r in rows:
    lines.append(
      f"| {r['row']} | {_x(r.get('traffic_x'))} | {_branches(r)}"
      f" | {r['fusions_entry']} / {r['fusions_averaging_branch']}"
      f" | {collectives(r['collectives'])}"
      f" | {r['conditionals']} / {r['loops']} / {r['host_transfers']} |"
    )
  return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
  """Two tables per configuration (memory; traffic and structure)."""
  v = report["versions"]
  out = [
    f"Compile-only analysis, matrix `{report['matrix']}`"
    f" ({len(report['results'])} programs in {report.get('elapsed_s', 0) / 60:.0f} min"
    f" on {report['machine']['cpus']} CPUs;"
    f" jax {v['jax']}, jaxlib {v['jaxlib']}, libtpu {v['libtpu']},"
    f" CUDA plugin {v['jax-cuda12-plugin']}; XLA_FLAGS `{v['XLA_FLAGS'] or 'none'}`,"
    f" LIBTPU_INIT_ARGS `{v['LIBTPU_INIT_ARGS'] or 'none'}`).",
    "",
    "Per chip, in units of the parameter bytes per chip (P). Device peak:"
    " argument + output - alias + temporary bytes; 'vs base': minus the same"
    " figure of the baseline row (adam alone, or adam inside the same wrapper);"
    " host: host-memory bytes; bytes: XLA's bytes accessed over the hand-fused"
    " step's; branch: bytes accessed of the step with every conditional forced"
    " to its averaging / skip branch (x P); fusions: in the entry computation /"
    " in the largest conditional branch; collectives: AG all-gather, AR"
    " all-reduce, RS reduce-scatter, A2A all-to-all, CP collective-permute;"
    " host copy: copy-start with a host-memory operand.",
  ]
  for config, rows in groups(report["results"]).items():
    r0 = rows[0]
    out += [
      "",
      f"### {' / '.join(map(str, config))}",
      "",
      f"{r0['devices']} devices, {r0['num_params'] / 1e9:.2f}B params, "
      f"P = {r0['param_bytes'] / 2**20:.1f} MiB per chip"
      " (float32 params; the bf16 rows: their own bytes).",
      "",
      memory_table(rows),
      "",
      structure_table(rows),
    ]
  if report.get("errors"):
    out += ["", "Errors:", ""] + [
      f"- {e['job']}: {e['error'][:300]}" for e in report["errors"]
    ]
  return "\n".join(out) + "\n"
