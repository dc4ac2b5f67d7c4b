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
    f" of wall time, {sum(r.get('cpu_s', 0) for r in report['results']) / 60:.0f}"
    f" CPU-minutes, on {report['machine']['cpus']} shared CPUs;"
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


def _find(results: list[dict[str, Any]], **where: Any) -> dict[tuple[Any, ...], Any]:
  out = {}
  for r in results:
    if all(r.get(k) == v for k, v in where.items()):
      out[r["row"]] = r
  return out


def pivot(
  results: list[dict[str, Any]],
  columns: list[tuple[str, dict[str, Any], str]],
  names: list[str],
) -> str:
  """A table: one line per row name, one column per (label, filter, field).

  Fields ``d_peak``, ``d_temp``, ``host_x``, ``traffic_x`` print as ratios;
  ``branches``, ``fusions``, ``collectives`` as in the per-job tables. A
  missing job prints ``n/r`` (not run).
  """
  found = [_find(results, **where) for _, where, _ in columns]
  lines = [
    "| row | " + " | ".join(label for label, _, _ in columns) + " |",
    "| --- |" + " ---: |" * len(columns),
  ]
  for name in names:
    cells = []
    for (_, _, field), got in zip(columns, found, strict=True):
      r = got.get(name)
      if r is None:
        cells.append("n/r")
      elif field == "branches":
        cells.append(_branches(r))
      elif field == "fusions":
        cells.append(f"{r['fusions_entry']} / {r['fusions_averaging_branch']}")
      elif field == "collectives":
        cells.append(collectives(r["collectives"]))
      else:
        cells.append(_x(r.get(field), signed=field.startswith("d_")))
    if any(c != "n/r" for c in cells):
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


_OPT = {"model": "1b", "program": "opt", "layout": "scan", "sharding": "fsdp"}
_TPU, _GPU = {"target": "v5e-256"}, {"target": "h100x8"}


def _optimizer_step_tables(
  results: list[dict[str, Any]], names: list[str]
) -> list[str]:
  """The optimizer step alone: memory, then branches and fusions."""
  opt, tpu, gpu = _OPT, _TPU, _GPU
  unrolled = {**opt, "layout": "unrolled"}
  return [
    "**The optimizer step alone** (1B, layers stacked, FSDP; per chip, x P;"
    " `n/r` marks a job not run: the TPU train step of rows that are not"
    " main rows, and the GPU's offload with `update_every`, which the"
    " deviceless compiler fails to trace):",
    "",
    pivot(
      results,
      [
        ("v5e-256 peak", {**tpu, **opt}, "d_peak"),
        ("v5e-256 temp", {**tpu, **opt}, "d_temp"),
        ("H100 x8 peak", {**gpu, **opt}, "d_peak"),
        ("H100 x8 temp", {**gpu, **opt}, "d_temp"),
        ("v5e-256 bytes", {**tpu, **opt}, "traffic_x"),
      ],
      names,
    ),
    "",
    "**Branches and fusions of the same step** (bytes accessed with every"
    " gate forced to its averaging / skip branch, x P; kFusion"
    " instructions in the entry / in a conditional's averaging branch, 0"
    " where the gate is a loop, whose body is not counted):",
    "",
    pivot(
      results,
      [
        ("v5e-256 branches", {**tpu, **opt}, "branches"),
        ("v5e-256 fusions", {**tpu, **opt}, "fusions"),
        ("H100 x8 fusions", {**gpu, **opt}, "fusions"),
        ("v5e-256 unrolled temp", {**tpu, **unrolled}, "d_temp"),
        ("H100 x8 unrolled temp", {**gpu, **unrolled}, "d_temp"),
      ],
      names,
    ),
  ]


def _train_step_tables(
  results: list[dict[str, Any]], names: list[str], main: list[str]
) -> list[str]:
  """The whole train step, then the main rows on the other targets."""
  opt, tpu, gpu = _OPT, _TPU, _GPU
  train = {**opt, "program": "train"}
  return [
    "**The whole train step** (1B, layers stacked, FSDP, bf16 activations;"
    " x P, and the collectives of the compiled step):",
    "",
    pivot(
      results,
      [
        ("v5e-256 peak", {**tpu, **train}, "d_peak"),
        ("v5e-256 temp", {**tpu, **train}, "d_temp"),
        ("H100 x8 peak", {**gpu, **train}, "d_peak"),
        ("v5e-256 collectives", {**tpu, **train}, "collectives"),
        ("H100 x8 collectives", {**gpu, **train}, "collectives"),
      ],
      names,
    ),
    "",
    "**The main rows on the other targets** (optimizer step alone, stacked"
    " layers, FSDP; device temporaries over the baseline, x P):",
    "",
    pivot(
      results,
      [
        ("v5p-128", {"target": "v5p-128", **opt}, "d_temp"),
        ("v6e-256", {"target": "v6e-256", **opt}, "d_temp"),
        ("v5e-256 x2 slices", {"target": "v5e-256x2", **opt}, "d_temp"),
        ("8B, v5e-256", {**tpu, **opt, "model": "8b"}, "d_temp"),
        ("8B, H200 x8", {"target": "h200x8", **opt, "model": "8b"}, "d_temp"),
      ],
      main,
    ),
  ]


def docs(results: list[dict[str, Any]], names: list[str], main: list[str]) -> str:
  """The performance guide's tables (at most six columns each)."""
  out = [*_optimizer_step_tables(results, names), ""]
  out += _train_step_tables(results, names, main)
  return "\n".join(out) + "\n"


def before_after(
  before: list[dict[str, Any]], after: list[dict[str, Any]], names: list[str]
) -> str:
  """Device temporaries over the baseline, before and after the engine changes."""
  opt = {"model": "1b", "program": "opt", "layout": "scan", "sharding": "fsdp"}
  columns = []
  for label, target in (("H100 x8", "h100x8"), ("v5e-256", "v5e-256")):
    columns.append((f"{label} before", before, {"target": target, **opt}, "d_temp"))
    columns.append((f"{label} after", after, {"target": target, **opt}, "d_temp"))
  columns.append(
    ("v5e-256 after, branches", after, {"target": "v5e-256", **opt}, "branches")
  )
  lines = [
    "| row | " + " | ".join(c[0] for c in columns) + " |",
    "| --- |" + " ---: |" * len(columns),
  ]
  for name in names:
    cells = []
    for _, results, where, field in columns:
      r = _find(results, **where).get(name)
      if r is None:
        cells.append("n/r")
      elif field == "branches":
        cells.append(_branches(r))
      else:
        cells.append(_x(r.get(field), signed=True))
    if any(c != "n/r" for c in cells[1::2]):
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
