"""Compile every (target, program, layout, sharding, row) job and tabulate it.

A job compiles one program with the state donated, on a deviceless target:

- ``opt``: the optimizer step alone, ``(params, state, grads) -> (params,
  state)`` (gradient-accumulation loops and split train steps compile it so);
- ``train``: the whole train step of the decoder, ``(params, state, tokens)
  -> (params, state, loss)``.

Shardings follow the guide's recipe: params from the logical axis rules,
the state's from :func:`optax_ema.state_shardings`, both as ``in_shardings``
and ``out_shardings``, params and state donated. For gated rows on TPU and
CPU the optimizer step is compiled twice more with ``optax_ema``'s
``lax.cond`` (and 0-or-1-iteration ``lax.while_loop``) forced to one
branch: the averaging step's and the skip step's traffic, each branch body
on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from . import metrics
from . import model as model_lib
from . import rows as rows_lib
from . import targets as targets_lib


@dataclasses.dataclass(frozen=True)
class Job:
  target: str
  model: str
  program: str  # "opt" or "train"
  layout: str  # "scan" or "unrolled"
  sharding: str  # "fsdp" or "fsdp+tp"
  row: str

  @property
  def key(self) -> str:
    return " | ".join(
      (self.target, self.model, self.program, self.layout, self.sharding, self.row)
    )


@contextlib.contextmanager
def forced_branch(taken: bool, package: str = "optax_ema") -> Iterator[None]:
  """``package``'s ``lax.cond`` takes one branch, its ``while_loop`` 1 or 0 turns.

  Traces each branch body of the averaging gate on its own, as the whole
  step, so that its traffic can be compiled and measured apart from the
  other branch. Conditionals of other code (``optax.MultiSteps``,
  ``optax.apply_if_finite``) stay as they are.
  """
  cond, while_loop = jax.lax.cond, jax.lax.while_loop

  def ours(*funs: Any) -> bool:
    return any(getattr(f, "__module__", "").split(".")[0] == package for f in funs)

  def forced_cond(
    pred: Any, true_fun: Any, false_fun: Any, *operands: Any, **kw: Any
  ) -> Any:
    if not ours(true_fun, false_fun):
      return cond(pred, true_fun, false_fun, *operands, **kw)
    if "operand" in kw:
      operands = (*operands, kw.pop("operand"))
    return (true_fun if taken else false_fun)(*operands)

  def forced_while(cond_fun: Any, body_fun: Any, init_val: Any) -> Any:
    if not ours(cond_fun, body_fun):
      return while_loop(cond_fun, body_fun, init_val)
    return body_fun(init_val) if taken else init_val

  jax.lax.cond, jax.lax.while_loop = forced_cond, forced_while
  try:
    yield
  finally:
    jax.lax.cond, jax.lax.while_loop = cond, while_loop


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def shard_bytes(abstract: Any) -> int:
  """Bytes of one device's shards of an abstract tree with shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def build(job: Job) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
  """The jitted program, its abstract arguments and facts about them."""
  target = targets_lib.TARGETS[job.target]
  tp = job.sharding == "fsdp+tp"
  scan = job.layout == "scan"
  config = model_lib.CONFIGS[job.model]
  row = rows_lib.ROWS[job.row]
  mesh = targets_lib.mesh(target, tp)
  axis_rules = model_lib.rules(tp, target.num_slices > 1)
  p_shardings = model_lib.param_shardings(config, scan, mesh, axis_rules)
  params = _with_shardings(
    model_lib.abstract_params(config, scan, row.param_dtype), p_shardings
  )
  opt = row.build()
  s_shardings = opt.shardings(params, p_shardings)
  state = _with_shardings(jax.eval_shape(opt.init, params), s_shardings)
  facts = {
    "devices": len(targets_lib.devices(target)),
    "num_params": model_lib.num_params(config),
    "param_bytes": shard_bytes(params),
    "state_bytes": shard_bytes(state),
  }
  if job.program == "opt":

    def opt_step(params: Any, state: Any, grads: Any) -> Any:
      return opt.step(params, grads, state)

    fn = jax.jit(
      opt_step,
      in_shardings=(p_shardings, s_shardings, p_shardings),
      out_shardings=(p_shardings, s_shardings),
      donate_argnums=(0, 1),
    )
    return fn, (params, state, params), facts
  tokens = model_lib.batch_spec(mesh, axis_rules, config)

  def train_step(params: Any, state: Any, tokens: Any) -> Any:
    value, grads = jax.value_and_grad(model_lib.loss, argnums=1)(
      config, params, tokens, mesh, axis_rules
    )
    params, state = opt.step(params, grads, state)
    return params, state, value

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(
    train_step,
    in_shardings=(p_shardings, s_shardings, tokens.sharding),
    out_shardings=(p_shardings, s_shardings, replicated),
    donate_argnums=(0, 1),
  )
  return fn, (params, state, tokens), facts


def compile_job(job: Job, branches: bool | None = None) -> dict[str, Any]:
  """Compile ``job`` and summarise it (and each branch body, for gated rows)."""
  fn, args, facts = build(job)
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out: dict[str, Any] = {**dataclasses.asdict(job), **facts}
  out.update(metrics.summary(compiled))
  out["lower_s"], out["compile_s"] = t1 - t0, t2 - t1
  platform = targets_lib.TARGETS[job.target].platform
  if branches is None:
    branches = (
      rows_lib.ROWS[job.row].gated
      and job.program == "opt"
      and platform in ("tpu", "cpu")
    )
  if branches:
    for name, taken in (("averaging", True), ("skip", False)):
      with forced_branch(taken):
        fn, args, _ = build(job)
        part = metrics.summary(fn.lower(*args).compile())
      out[f"{name}_branch"] = {
        k: part[k] for k in ("bytes_accessed", "temp", "device_peak", "fusions_entry")
      }
  out["cpu_s"] = time.process_time() - c0  # every thread, the branches' compiles too
  return out


LAYOUTS = ("scan", "unrolled")
SHARDINGS = ("fsdp", "fsdp+tp")


def plan(name: str) -> list[Job]:
  """The jobs of a named matrix: ``full``, ``quick``, ``cpu`` or ``dry-run``."""
  jobs: list[Job] = []

  def add(
    target: str,
    model: str,
    rows: list[str],
    programs: Any,
    layouts: Any,
    shardings: Any,
  ) -> None:
    for program in programs:
      for layout in layouts:
        for sharding in shardings:
          for row in rows_lib.needed(rows):
            jobs.append(Job(target, model, program, layout, sharding, row))

  every = list(rows_lib.ROWS)
  main = rows_lib.MAIN
  if name == "dry-run":  # the test suite's: a few seconds per program
    add(
      "cpu8",
      "tiny",
      ["hand-fused", "update_every=10", "offload"],
      ("opt",),
      ("scan",),
      ("fsdp",),
    )
    add("cpu8", "tiny", ["moving_average"], ("train",), ("unrolled",), ("fsdp+tp",))
  elif name == "cpu":
    add("cpu8", "tiny", every, ("opt", "train"), ("scan",), ("fsdp",))
    add("cpu8", "tiny", main, ("opt",), ("unrolled",), ("fsdp+tp",))
  elif name == "quick":
    add("v5e-4", "1b", main, ("opt",), ("scan",), ("fsdp",))
    add("h100x8", "1b", main, ("opt",), ("scan",), ("fsdp",))
  elif name == "full":  # in order of priority: a cut-short run keeps the first
    first = ["adam", "hand-fused", "moving_average", "update_every=10", "offload"]
    for target in ("h100x8", "v5e-256"):
      add(target, "1b", every, ("opt",), ("scan",), ("fsdp",))
      add(target, "1b", first, ("train",), ("scan",), ("fsdp",))
    for target in ("v5p-128", "v6e-256", "v5e-256x2"):
      add(target, "1b", main, ("opt",), ("scan",), ("fsdp",))
    for target in ("h100x8", "v5e-256"):
      add(target, "1b", every, ("opt",), ("unrolled",), ("fsdp",))
      add(target, "1b", main, ("opt",), ("scan",), ("fsdp+tp",))
    for target in ("h100x8", "h200x8", "v5e-256"):
      add(target, "8b", main, ("opt",), ("scan",), ("fsdp",))
    # A TPU whole train step takes about 190 CPU-seconds to compile (a GPU
    # one 10-40): on TPU the train step is compiled for the main rows only.
    add("v5e-256", "1b", main, ("train",), ("scan",), ("fsdp",))
    add("h100x8", "1b", every, ("train",), ("scan",), ("fsdp",))
    add("h100x8", "1b", main, ("train",), ("unrolled",), ("fsdp",))
    add("h100x8", "1b", main, ("train",), ("scan",), ("fsdp+tp",))
    for target in ("h100x8", "h200x8"):
      add(target, "8b", main, ("train",), ("scan",), ("fsdp",))
  else:
    raise ValueError(f"unknown matrix {name!r}: use full, quick, cpu or dry-run.")
  seen: set[str] = set()
  return [j for j in jobs if not (j.key in seen or seen.add(j.key))]


def ratios(results: list[dict[str, Any]]) -> None:
  """Add each result's figures relative to its baseline and the hand-fused step.

  In units of the row's parameter bytes per chip: ``d_peak``, ``d_temp``
  (against the baseline row of the same configuration), ``host_x`` (host
  bytes), ``state_x``; ``traffic_x``: bytes accessed over the hand-fused
  step's.
  """
  by_key = {
    (r["target"], r["model"], r["program"], r["layout"], r["sharding"], r["row"]): r
    for r in results
  }
  for r in results:
    config = (r["target"], r["model"], r["program"], r["layout"], r["sharding"])
    base = by_key.get((*config, rows_lib.ROWS[r["row"]].baseline))
    fused = by_key.get((*config, "hand-fused"))
    p = r["param_bytes"]
    r["peak_x"] = r["device_peak"] / p
    r["host_x"] = r["host_bytes"] / p
    if base is not None:
      r["d_peak"] = (r["device_peak"] - base["device_peak"]) / p
      r["d_temp"] = (r["temp"] - base["temp"]) / p
      r["d_state"] = (r["state_bytes"] - base["state_bytes"]) / p
    if fused is not None and r["bytes_accessed"] and fused["bytes_accessed"]:
      r["traffic_x"] = r["bytes_accessed"] / fused["bytes_accessed"]
