"""The cost of averaging parameters: optax_ema against every peer and the floor.

An EMA step is pure memory traffic: read the new parameters and the average,
write the average, 12 bytes per float32 parameter. This script measures, on
transformer-like float32 parameter trees with fixed random gradients (the
forward/backward pass is not measured), the time per training step of:

- ``optax.adam`` alone, jitted with parameters and state donated (the
  baseline), and ``optax_ema.moving_average(optax.adam)`` (also with
  ``update_every=10``, with two decays, and with the averages offloaded to
  host memory, ``offload=True``, when the installed optax_ema has them; on a
  CPU both memories are the same RAM, so the offload rows measure the
  bookkeeping, not a host link);
- a hand-written EMA fused into the same jitted step, and one in a second
  jitted call; ``moving_average(adam)`` without donation (against adam without
  donation); adam / ``moving_average(adam)`` over one flattened parameter
  vector (the fusion experiment);
- Flax NNX ``nnx.Optimizer`` with and without ``nnx.EMA`` in ``nnx.jit``;
- Keras 3 (JAX backend) ``Adam`` with and without ``use_ema=True``, through
  the stateless API inside ``jax.jit``;
- the floor: one jitted, donated ``e + (1 - d) * (p - e)`` over one flat array
  of the same total size, and STREAM-like scale (``b = s * a``) and triad
  (``a = b + s * c``) bandwidths.

Every row is first checked against a NumPy EMA of its own parameter
trajectory (same decay, a few steps; at the smallest size by default, at every
size with ``--check-sizes all``), so the table compares like with like. Rows
are then timed interleaved: each of ``--rounds`` rounds visits every row (in
a rotated order), re-initialises its state (so allocation luck is sampled
too), runs one untimed step and times ``--steps`` steps one by one
(``block_until_ready`` after each, host transfers disallowed, retraces
counted). Peak memory comes from a fresh subprocess per row (process peak RSS,
``VmHWM``, after init and 3 steps; at the largest size by default, see
``--memory-sizes``) and from XLA's compiled memory analysis of the step, with
the number of array-sized loops the compiled step runs.

Columns: median ms/step [25th-75th percentile], the EMA overhead over the same
framework's optimizer alone, that overhead divided by the floor, peak RSS, and
XLA's argument / output / alias / temp bytes of the compiled step.

Run (``pip install -e .[bench]``; about 9 minutes on a 2-core CPU box)::

  python benchmarks/bench_ema.py                   # full run, writes JSON
  python benchmarks/bench_ema.py --quick           # small smoke configuration
  python benchmarks/bench_ema.py --sizes 1M --rounds 3 --steps 50

The JSON (``--out``, default ``benchmarks/results/bench_ema.json``) holds the
raw samples, the per-row summaries and the machine information; the printed
table is also written next to it as ``.txt`` and as Markdown (``.md``, the
performance guide's tables), with the performance targets evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import flatten_util

import optax_ema

LEARNING_RATE = 1e-2
DECAY = 0.99
DECAYS = (0.99, 0.999)
UPDATE_EVERY = 10
ADAM = "optax adam"
OURS = "moving_average(adam)"
OURS_EVERY = f"moving_average(adam, update_every={UPDATE_EVERY})"
OFFLOAD = "moving_average(adam, offload=True)"
OFFLOAD_EVERY = f"moving_average(adam, offload=True, update_every={UPDATE_EVERY})"
FLOOR = "floor: flat e + (1-d)(p-e)"
SCALE = "STREAM scale b = s*a"
TRIAD = "STREAM triad a = b + s*c"

# name -> (layers, width, total parameters): ~50, ~200 and ~200 leaves.
SIZES: dict[str, tuple[int, int, int]] = {
  "64K": (2, 32, 65_536),
  "1M": (4, 128, 1_000_000),
  "16M": (16, 256, 16_000_000),
  "64M": (16, 512, 64_000_000),
}


# ---------------------------------------------------------------------------
# Parameter trees


def tree_shapes(size: str) -> dict[str, Any]:
  """Shapes of a transformer-like parameter tree of about ``size`` params.

  An embedding (its row count fills the budget), ``layers`` blocks of
  layer norms, attention (qkv and output) and MLP matrices with biases, and a
  final layer norm: ``12 * layers + 3`` leaves.
  """
  layers, d, total = SIZES[size]
  per_layer = {
    "ln1": {"scale": (d,), "bias": (d,)},
    "attn": {
      "qkv_w": (d, 3 * d),
      "qkv_b": (3 * d,),
      "out_w": (d, d),
      "out_b": (d,),
    },
    "ln2": {"scale": (d,), "bias": (d,)},
    "mlp": {"w1": (d, 4 * d), "b1": (4 * d,), "w2": (4 * d, d), "b2": (d,)},
  }
  layer_params = sum(
    int(np.prod(s)) for s in jax.tree.leaves(per_layer, is_leaf=_is_shape)
  )
  vocab = max(1, (total - layers * layer_params - 2 * d) // d)
  tree: dict[str, Any] = {"embed": (vocab, d)}
  for i in range(layers):
    tree[f"layer_{i:02d}"] = per_layer
  tree["final_ln"] = {"scale": (d,), "bias": (d,)}
  return tree


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def num_params(size: str) -> int:
  shapes = jax.tree.leaves(tree_shapes(size), is_leaf=_is_shape)
  return int(sum(np.prod(s) for s in shapes))


def num_leaves(size: str) -> int:
  return len(jax.tree.leaves(tree_shapes(size), is_leaf=_is_shape))


@functools.cache
def _tree_makers(size: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
  shapes = tree_shapes(size)
  paths_shapes = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]
  treedef = jax.tree.structure(shapes, is_leaf=_is_shape)

  def make(seed: int, scale: float, is_grad: bool) -> Any:
    # A cheap deterministic hash (sin of a scaled index) rather than
    # jax.random: it compiles and runs in a fraction of the time at 64M.
    leaves, offset = [], 0
    for path, shape in paths_shapes:
      size = int(np.prod(shape))
      index = jax.lax.iota(jnp.float32, size) + float(offset)
      x = scale * jnp.sin(index * 12.9898 + 78.233 * seed).reshape(shape)
      if not is_grad and "scale" in jax.tree_util.keystr(path):
        x = 1.0 + x
      leaves.append(x)
      offset += size
    return jax.tree.unflatten(treedef, leaves)

  params = jax.jit(functools.partial(make, 0, 0.02, False))
  grads = jax.jit(functools.partial(make, 1, 1e-3, True))
  return params, grads


def make_params(size: str) -> Any:
  """Fresh float32 parameters, created on the device (no host copy)."""
  return _tree_makers(size)[0]()


def make_grads(size: str) -> Any:
  """Fixed random float32 gradients shaped like the parameters."""
  return _tree_makers(size)[1]()


# ---------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Runner:
  """One row, set up for one size: a step function over an opaque state.

  Attributes:
    init: returns a fresh state (parameters, optimizer state, average).
    step: one training step, ``state -> state`` (the dispatches it makes are
      what is timed).
    params: host copies of the parameter leaves of a state (a list).
    averages: host copies of the averaged leaves, one list per average.
    memory: XLA compiled memory analysis of the step, per jitted call.
    traces: how many times the step functions were traced.
    dispatches: jitted calls per training step.
    convention: how the average starts: "copy" (average_0 = params_0) or
      "keras" (the first step copies the new params).
    decays: the decay of each average and its update period.
  """

  init: Callable[[], Any]
  step: Callable[[Any], Any]
  params: Callable[[Any], list[np.ndarray]]
  averages: Callable[[Any], list[list[np.ndarray]]]
  memory: Callable[[Any], list[dict[str, int]]]
  traces: list[int]
  dispatches: int = 1
  convention: str = "copy"
  decays: tuple[float, ...] = ()
  update_every: int = 1


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  group: str
  baseline: str | None  # row the EMA overhead is measured against
  make: Callable[[str], Runner]
  kind: str = "step"  # "step", "floor" or "bandwidth"


def _host_leaves(tree: Any) -> list[np.ndarray]:
  return [np.array(x) for x in jax.tree.leaves(tree)]  # copies, never views


def _memory_stats(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  out = {
    "argument_bytes": int(stats.argument_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "alias_bytes": int(stats.alias_size_in_bytes),
    "temp_bytes": int(stats.temp_size_in_bytes),
    "fusions": _count_fusions(compiled.as_text()),
  }
  for field in ("host_argument", "host_output", "host_alias", "host_temp"):
    value = getattr(stats, f"{field}_size_in_bytes", None)
    if value is not None:
      out[f"{field}_bytes"] = int(value)
  return out


def _count_fusions(hlo: str) -> int:
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


def _optax_runner(
  size: str,
  tx: optax.GradientTransformation,
  *,
  donate: bool = True,
  flat: bool = False,
  average_of: Callable[[Any], list[Any]] | None = None,
  decays: tuple[float, ...] = (),
  update_every: int = 1,
) -> Runner:
  traces = [0]
  grads = make_grads(size)
  if flat:
    grads = flatten_util.ravel_pytree(grads)[0]

  def train_step(params: Any, opt_state: Any, grads: Any) -> Any:
    traces[0] += 1
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jitted = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())

  @jax.jit
  def init_state(params: Any) -> Any:
    return tx.init(params)

  def init() -> Any:
    params = make_params(size)
    if flat:
      params = flatten_util.ravel_pytree(params)[0]
    return params, init_state(params)

  def step(state: Any) -> Any:
    return jitted(state[0], state[1], grads)

  def averages(state: Any) -> list[list[np.ndarray]]:
    if average_of is None:
      return []
    return [_host_leaves(a) for a in average_of(state[1])]

  def memory(state: Any) -> list[dict[str, int]]:
    return [_memory_stats(jitted.lower(state[0], state[1], grads).compile())]

  return Runner(
    init,
    step,
    lambda s: _host_leaves(s[0]),
    averages,
    memory,
    traces,
    decays=decays,
    update_every=update_every,
  )


def _optax_ema_runner(size: str, **kwargs: Any) -> Runner:
  flat = kwargs.pop("flat", False)
  donate = kwargs.pop("donate", True)
  decay = kwargs.get("average_decay", DECAY)
  tx = optax_ema.moving_average(optax.adam(LEARNING_RATE), **kwargs)
  if isinstance(decay, tuple):
    decays = decay

    def average_of(opt_state: Any) -> list[Any]:
      return [optax_ema.averaged_params(opt_state, which=i) for i in range(len(decay))]

  else:
    decays = (decay,)

    def average_of(opt_state: Any) -> list[Any]:
      return [optax_ema.averaged_params(opt_state)]

  return _optax_runner(
    size,
    tx,
    donate=donate,
    flat=flat,
    average_of=average_of,
    decays=decays,
    update_every=kwargs.get("update_every", 1),
  )


def _hand_runner(size: str, *, second_call: bool) -> Runner:
  """A hand-written EMA, fused into the adam step or in a second jitted call."""
  traces = [0]
  tx = optax.adam(LEARNING_RATE)
  grads = make_grads(size)

  def ema(average: Any, params: Any) -> Any:
    return jax.tree.map(lambda e, p: e + (1.0 - DECAY) * (p - e), average, params)

  def adam_step(params: Any, opt_state: Any, grads: Any) -> Any:
    traces[0] += 1
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def fused_step(params: Any, opt_state: Any, average: Any, grads: Any) -> Any:
    params, opt_state = adam_step(params, opt_state, grads)
    return params, opt_state, ema(average, params)

  def ema_step(average: Any, params: Any) -> Any:
    traces[0] += 1
    return ema(average, params)

  fused = jax.jit(fused_step, donate_argnums=(0, 1, 2))
  first = jax.jit(adam_step, donate_argnums=(0, 1))
  second = jax.jit(ema_step, donate_argnums=(0,))

  @jax.jit
  def init_state(params: Any) -> Any:
    return tx.init(params), jax.tree.map(jnp.copy, params)

  def init() -> Any:
    params = make_params(size)
    return (params, *init_state(params))

  def step(state: Any) -> Any:
    params, opt_state, average = state
    if second_call:
      params, opt_state = first(params, opt_state, grads)
      return params, opt_state, second(average, params)
    return fused(params, opt_state, average, grads)

  def memory(state: Any) -> list[dict[str, int]]:
    params, opt_state, average = state
    if second_call:
      return [
        _memory_stats(first.lower(params, opt_state, grads).compile()),
        _memory_stats(second.lower(average, params).compile()),
      ]
    return [_memory_stats(fused.lower(params, opt_state, average, grads).compile())]

  return Runner(
    init,
    step,
    lambda s: _host_leaves(s[0]),
    lambda s: [_host_leaves(s[2])],
    memory,
    traces,
    dispatches=2 if second_call else 1,
    decays=(DECAY,),
  )


def _nnx_runner(size: str, *, use_ema: bool) -> Runner:
  """Flax NNX: ``nnx.Optimizer`` (+ ``nnx.EMA``) updated inside ``nnx.jit``."""
  from flax import nnx

  traces = [0]

  class Params(nnx.Module):
    def __init__(self, tree: Any) -> None:
      self.tree = nnx.data(jax.tree.map(nnx.Param, tree))

  grads_tree = make_grads(size)

  def train_step(model: Any, optimizer: Any, ema: Any, grads: Any) -> None:
    traces[0] += 1
    optimizer.update(model, grads)
    if ema is not None:
      ema.update(model)

  jitted = nnx.jit(train_step, donate_argnums=(0, 1, 2))
  grads_holder: list[Any] = []

  def init() -> Any:
    model = Params(make_params(size))
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    ema = nnx.EMA(model, decay=DECAY) if use_ema else None
    if not grads_holder:
      state = nnx.state(model, nnx.Param)
      grads_holder.append(
        jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(grads_tree))
      )
    return model, optimizer, ema

  def step(state: Any) -> Any:
    jitted(*state, grads_holder[0])
    return state

  def params(state: Any) -> list[np.ndarray]:
    return _host_leaves(nnx.state(state[0], nnx.Param))

  def averages(state: Any) -> list[list[np.ndarray]]:
    return [_host_leaves(state[2].params)] if use_ema else []

  def memory(state: Any) -> list[dict[str, int]]:
    return [_memory_stats(jitted.lower(*state, grads_holder[0]).compile())]

  return Runner(
    init,
    step,
    params,
    averages,
    memory,
    traces,
    decays=(DECAY,) if use_ema else (),
  )


def _keras_runner(size: str, *, use_ema: bool) -> Runner:
  """Keras 3 on JAX: ``Adam(use_ema=...)`` via ``stateless_apply`` in jax.jit."""
  import keras

  if keras.backend.backend() != "jax":
    raise RuntimeError(
      "Keras must use the JAX backend: set KERAS_BACKEND=jax before importing "
      f"keras (it uses {keras.backend.backend()!r})."
    )
  traces = [0]
  grads = jax.tree.leaves(make_grads(size))
  optimizer = keras.optimizers.Adam(
    learning_rate=LEARNING_RATE, use_ema=use_ema, ema_momentum=DECAY
  )
  built: list[Any] = []

  def train_step(params: list[Any], opt_vars: list[Any], grads: list[Any]) -> Any:
    traces[0] += 1
    return optimizer.stateless_apply(opt_vars, grads, params)

  jitted = jax.jit(train_step, donate_argnums=(0, 1))
  zeros = jax.jit(lambda xs: [jnp.zeros_like(x) for x in xs])

  def init() -> Any:
    params = jax.tree.leaves(make_params(size))
    if not built:
      variables = [keras.Variable(p) for p in params]
      optimizer.build(variables)
      built.append(variables)
      opt_vars = [v.value for v in optimizer.variables]
    else:
      opt_vars = zeros([v.value for v in optimizer.variables])
    return params, opt_vars

  def step(state: Any) -> Any:
    return jitted(state[0], state[1], grads)

  def averages(state: Any) -> list[list[np.ndarray]]:
    if not use_ema:
      return []
    paths = [v.path for v in optimizer.variables]
    return [
      [
        np.asarray(v)
        for p, v in zip(paths, state[1], strict=True)
        if p.endswith("_average")
      ]
    ]

  def memory(state: Any) -> list[dict[str, int]]:
    return [_memory_stats(jitted.lower(state[0], state[1], grads).compile())]

  return Runner(
    init,
    step,
    lambda s: [np.asarray(p) for p in s[0]],
    averages,
    memory,
    traces,
    convention="keras",
    decays=(DECAY,) if use_ema else (),
  )


def _flat_runner(size: str, kind: str) -> Runner:
  """The floor (flat EMA) and the STREAM-like scale / triad kernels."""
  n = num_params(size)
  traces = [0]

  def floor(e: jax.Array, p: jax.Array) -> jax.Array:
    traces[0] += 1
    return e + (1.0 - DECAY) * (p - e)

  def scale(b: jax.Array, a: jax.Array, s: jax.Array) -> jax.Array:
    traces[0] += 1
    del b
    return s * a

  def triad(a: jax.Array, b: jax.Array, c: jax.Array, s: jax.Array) -> jax.Array:
    traces[0] += 1
    del a
    return b + s * c

  fn = {"floor": floor, "scale": scale, "triad": triad}[kind]
  # keep_unused: scale and triad ignore their donated output buffer's values.
  jitted = jax.jit(fn, donate_argnums=(0,), keep_unused=True)
  s = jnp.float32(3.0)

  @jax.jit
  def make() -> tuple[jax.Array, ...]:
    return (
      0.02 * jnp.sin(jax.lax.iota(jnp.float32, n) * 12.9898),
      0.02 * jnp.sin(jax.lax.iota(jnp.float32, n) * 12.9898 + 78.233),
      0.02 * jnp.sin(jax.lax.iota(jnp.float32, n) * 12.9898 + 2 * 78.233),
    )

  def init() -> Any:
    return make()

  def step(state: Any) -> Any:
    x, y, z = state
    if kind == "floor":
      return jitted(x, y), y, z
    if kind == "scale":
      return jitted(x, y, s), y, z
    return jitted(x, y, z, s), y, z

  def args(state: Any) -> tuple[Any, ...]:
    x, y, z = state
    return {"floor": (x, y), "scale": (x, y, s), "triad": (x, y, z, s)}[kind]

  def memory(state: Any) -> list[dict[str, int]]:
    return [_memory_stats(jitted.lower(*args(state)).compile())]

  return Runner(
    init,
    step,
    lambda st: [np.asarray(x) for x in st],
    lambda st: [],
    memory,
    traces,
    decays=(DECAY,) if kind == "floor" else (),
  )


def _has_update_every() -> bool:
  return "update_every" in inspect.signature(optax_ema.moving_average).parameters


def _has_offload() -> bool:
  return "offload" in inspect.signature(optax_ema.moving_average).parameters


def _accepts_several_decays() -> bool:
  try:
    optax_ema.moving_average(optax.sgd(0.1), average_decay=DECAYS)
  except (TypeError, ValueError):
    return False
  return True


def all_rows() -> list[Row]:
  """Every row this installation can run, in table order."""
  adam = ADAM
  rows = [
    Row(adam, "optax", None, lambda s: _optax_runner(s, optax.adam(LEARNING_RATE))),
    Row(OURS, "optax", adam, lambda s: _optax_ema_runner(s)),
  ]
  if _has_update_every():
    rows.append(
      Row(
        OURS_EVERY,
        "optax",
        adam,
        lambda s: _optax_ema_runner(s, update_every=UPDATE_EVERY),
      )
    )
  if _accepts_several_decays():
    rows.append(
      Row(
        f"moving_average(adam, decays={DECAYS})",
        "optax",
        adam,
        lambda s: _optax_ema_runner(s, average_decay=DECAYS),
      )
    )
  if _has_offload():
    rows += [
      Row(OFFLOAD, "offload", adam, lambda s: _optax_ema_runner(s, offload=True)),
      Row(
        OFFLOAD_EVERY,
        "offload",
        adam,
        lambda s: _optax_ema_runner(s, offload=True, update_every=UPDATE_EVERY),
      ),
    ]
  rows += [
    Row(
      "hand EMA fused in step",
      "optax",
      adam,
      lambda s: _hand_runner(s, second_call=False),
    ),
    Row(
      "hand EMA, 2nd jitted call",
      "optax",
      adam,
      lambda s: _hand_runner(s, second_call=True),
    ),
    Row(
      "optax adam, not donated",
      "undonated",
      None,
      lambda s: _optax_runner(s, optax.adam(LEARNING_RATE), donate=False),
    ),
    Row(
      "moving_average(adam), not donated",
      "undonated",
      "optax adam, not donated",
      lambda s: _optax_ema_runner(s, donate=False),
    ),
    Row(
      "optax adam, flat vector",
      "flat",
      None,
      lambda s: _optax_runner(s, optax.adam(LEARNING_RATE), flat=True),
    ),
    Row(
      "moving_average(adam), flat vector",
      "flat",
      "optax adam, flat vector",
      lambda s: _optax_ema_runner(s, flat=True),
    ),
    Row(
      "nnx.Optimizer(adam)", "flax nnx", None, lambda s: _nnx_runner(s, use_ema=False)
    ),
    Row(
      "nnx.Optimizer(adam) + nnx.EMA",
      "flax nnx",
      "nnx.Optimizer(adam)",
      lambda s: _nnx_runner(s, use_ema=True),
    ),
    Row("keras Adam", "keras", None, lambda s: _keras_runner(s, use_ema=False)),
    Row(
      "keras Adam(use_ema=True)",
      "keras",
      "keras Adam",
      lambda s: _keras_runner(s, use_ema=True),
    ),
    Row(FLOOR, "floor", None, lambda s: _flat_runner(s, "floor"), "floor"),
    Row(SCALE, "floor", None, lambda s: _flat_runner(s, "scale"), "bandwidth"),
    Row(TRIAD, "floor", None, lambda s: _flat_runner(s, "triad"), "bandwidth"),
  ]
  return rows


# ---------------------------------------------------------------------------
# Correctness


def _reference_step(
  average: list[np.ndarray],
  params: list[np.ndarray],
  t: int,
  decay: float,
  convention: str,
  update_every: int,
) -> list[np.ndarray]:
  """The NumPy EMA after training step ``t`` (1, 2, ...), in float64."""
  if convention == "keras" and t == 1:
    d = 0.0
  elif t % update_every:
    return average
  else:
    d = decay**update_every
  return [
    d * a + (1.0 - d) * p.astype(np.float64)
    for a, p in zip(average, params, strict=True)
  ]


def reference_averages(
  trajectory: list[list[np.ndarray]],
  decay: float,
  convention: str,
  update_every: int = 1,
) -> list[np.ndarray]:
  """A NumPy EMA of ``trajectory`` (params before step 1, after step 1, ...).

  ``copy``: the average starts at the initial params and moves towards the
  params after each step, ``a <- d * a + (1 - d) * p``; with ``update_every=k``
  it moves only after steps k, 2k, ... with decay ``d ** k``. ``keras``: the
  first step copies the new params, later steps use ``d``.
  """
  average = [x.astype(np.float64) for x in trajectory[0]]
  for t, params in enumerate(trajectory[1:], start=1):
    average = _reference_step(average, params, t, decay, convention, update_every)
  return average


def check_row(
  row: Row, size: str, steps: int = 3, runner: Runner | None = None
) -> dict[str, Any]:
  """Runs ``steps`` steps of ``row`` and compares its average(s) with NumPy.

  The NumPy EMA follows the row's own parameter trajectory (so peers whose
  Adam differs slightly are still checked exactly). Raises AssertionError on
  a mismatch; returns what was checked.
  """
  runner = runner or row.make(size)
  state = runner.init()
  if row.kind == "bandwidth":
    state = runner.step(state)
    x, y, z = (np.asarray(v, np.float64) for v in state)
    expected = 3.0 * y if "scale" in row.name else y + 3.0 * z
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-7, err_msg=row.name)
    return {"row": row.name, "checked": "kernel output vs NumPy"}
  if row.kind == "floor":
    e0, p = (np.asarray(v, np.float64) for v in state[:2])
    for _ in range(steps):
      state = runner.step(state)
    expected = p + DECAY**steps * (e0 - p)
    np.testing.assert_allclose(
      np.asarray(state[0]), expected, rtol=1e-5, atol=1e-7, err_msg=row.name
    )
    return {"row": row.name, "checked": f"flat EMA vs NumPy over {steps} steps"}
  first = runner.params(state)
  references = [[x.astype(np.float64) for x in first] for _ in runner.decays]
  n = steps * runner.update_every
  for t in range(1, n + 1):
    state = runner.step(state)
    if t % runner.update_every == 0 or runner.convention == "keras" or t == n:
      params = runner.params(state)
      references = [
        _reference_step(ref, params, t, d, runner.convention, runner.update_every)
        for ref, d in zip(references, runner.decays, strict=True)
      ]
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(params, first, strict=True))
  assert moved > 1e-4, f"{row.name}: the parameters did not move ({moved})"
  got = runner.averages(state)
  assert len(got) == len(runner.decays), (
    f"{row.name}: {len(got)} averages, expected {len(runner.decays)}"
  )
  for average, expected, decay in zip(got, references, runner.decays, strict=True):
    assert len(average) == len(expected), row.name
    for a, e in zip(average, expected, strict=True):
      np.testing.assert_allclose(
        a, e, rtol=2e-5, atol=2e-6, err_msg=f"{row.name} (decay {decay})"
      )
    stale = max(
      float(np.max(np.abs(a - p))) for a, p in zip(expected, first, strict=True)
    )
    assert stale > 20 * 2e-6, (
      f"{row.name}: the reference average did not move ({stale})"
    )
  return {"row": row.name, "checked": f"{len(got)} average(s) vs NumPy over {n} steps"}


# ---------------------------------------------------------------------------
# Timing


def _block(state: Any) -> None:
  jax.block_until_ready(jax.tree.leaves(state))


def time_rows(
  rows: list[Row],
  runners: dict[str, Runner],
  size: str,
  rounds: int,
  steps: int,
  log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
  """Interleaved timing: each round visits every row in a rotated order."""
  results: dict[str, dict[str, Any]] = {
    row.name: {"samples_ms": [], "traces_after_warmup": 0} for row in rows
  }
  for r in range(rounds):
    order = rows[r % len(rows) :] + rows[: r % len(rows)]
    for row in order:
      runner = runners[row.name]
      state = runner.init()
      state = runner.step(state)  # compiled on the first round
      _block(state)
      traces = runner.traces[0]
      samples = results[row.name]["samples_ms"]
      gc.collect()
      gc.disable()
      try:
        with jax.transfer_guard("disallow"):
          for _ in range(steps):
            t0 = time.perf_counter()
            state = runner.step(state)
            _block(state)
            samples.append((time.perf_counter() - t0) * 1e3)
      finally:
        gc.enable()
      results[row.name]["traces_after_warmup"] += runner.traces[0] - traces
      results[row.name]["dispatches_per_step"] = runner.dispatches
      del state
    log(f"  {size}: round {r + 1}/{rounds} done")
  return results


def summarize(samples: list[float]) -> dict[str, float]:
  q25, q50, q75 = np.percentile(samples, [25, 50, 75])
  return {
    "median_ms": float(q50),
    "p25_ms": float(q25),
    "p75_ms": float(q75),
    "min_ms": float(np.min(samples)),
  }


# ---------------------------------------------------------------------------
# Memory (fresh subprocess per row)


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
    _block(state)
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
    os.path.abspath(__file__),
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


# ---------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gb = None
  try:
    with open("/proc/meminfo") as f:
      mem_gb = round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    pass
  versions = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
  }
  versions["optax_ema"] = optax_ema.__version__
  versions["numpy"] = np.__version__
  for name in ("flax", "keras"):
    try:
      versions[name] = __import__(name).__version__
    except ImportError:
      versions[name] = None
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "memory_gb": mem_gb,
    "platform": platform.platform(),
    "device": str(jax.devices()[0]),
    "loadavg_at_start": os.getloadavg(),
    "versions": versions,
  }


def build_table(report: dict[str, Any]) -> str:
  lines = []
  for size, block in report["sizes"].items():
    n = block["num_params"]
    floor = block["floor_ms"]
    lines.append(
      f"\n{size}: {n:,} float32 params in {block['num_leaves']} leaves "
      f"({4 * n / 2**20:.0f} MiB); floor {floor:.3f} ms "
      f"({12 * n / floor / 1e6:.1f} GB/s at 12 B/param); STREAM scale "
      f"{block['scale_gbs']:.1f} GB/s, triad {block['triad_gbs']:.1f} GB/s"
    )
    header = (
      f"{'row':46s} {'ms/step [p25-p75]':>22s} {'EMA ms':>8s} {'/floor':>7s} "
      f"{'RSS MiB':>8s} {'XLA arg/out/alias/temp MiB':>27s} {'kern':>5s}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for name, r in block["rows"].items():
      t = f"{r['median_ms']:.3f} [{r['p25_ms']:.3f}-{r['p75_ms']:.3f}]"
      over = r.get("overhead_ms")
      over_s = f"{over:+.3f}" if over is not None else ""
      ratio = f"{r['overhead_over_floor']:.2f}x" if over is not None else ""
      mem = r.get("memory") or {}
      rss = f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-"
      xla = mem.get("xla")
      if xla:
        tot = {k: sum(x[k] for x in xla) / 2**20 for k in xla[0] if k != "fusions"}
        xla_s = (
          f"{tot['argument_bytes']:.1f}/{tot['output_bytes']:.1f}/"
          f"{tot['alias_bytes']:.1f}/{tot['temp_bytes']:.1f}"
        )
        kern = str(sum(x["fusions"] for x in xla))
      else:
        xla_s, kern = "-", "-"
      flags = ""
      if r["traces_after_warmup"]:
        flags += " RETRACED"
      if r["dispatches_per_step"] > 1:
        flags += f" ({r['dispatches_per_step']} calls)"
      cells = f"{t:>22s} {over_s:>8s} {ratio:>7s} {rss:>8s} {xla_s:>27s} {kern:>5s}"
      lines.append(f"{name + flags:46s} {cells}")
  return "\n".join(lines)


def build_markdown(report: dict[str, Any]) -> str:
  """The run as Markdown: the README's performance table and target verdicts."""
  m = report["machine"]
  out = [
    f"Run {report['date_utc']} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB, "
    f"{m['device']}), jax {m['versions']['jax']}, optax {m['versions']['optax']}, "
    f"flax {m['versions']['flax']}, keras {m['versions']['keras']}; load average "
    f"at start {m['loadavg_at_start'][0]:.2f}; `{report['command']}` "
    f"({report['wall_s']:.0f} s).",
  ]
  for size, block in report["sizes"].items():
    n = block["num_params"]
    out += [
      "",
      f"**{size}**: {n:,} float32 parameters in {block['num_leaves']} leaves; "
      f"floor {block['floor_ms']:.3f} ms ({12 * n / block['floor_ms'] / 1e6:.1f} GB/s "
      f"at 12 B/param); STREAM-like scale {block['scale_gbs']:.1f} GB/s, triad "
      f"{block['triad_gbs']:.1f} GB/s.",
      "",
      "| row | ms/step, median [p25-p75] | EMA overhead ms | overhead / floor "
      "| peak RSS MiB | XLA arg / out / alias / temp MiB | loops |",
      "|---|---|---|---|---|---|---|",
    ]
    for name, r in block["rows"].items():
      over = r.get("overhead_ms")
      mem = r.get("memory") or {}
      xla = mem.get("xla") or []
      tot = {
        k: sum(x[k] for x in xla) / 2**20
        for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
      }
      xla_s = (
        "{argument_bytes:.1f} / {output_bytes:.1f} / {alias_bytes:.1f} / "
        "{temp_bytes:.1f}".format(**tot)
        if xla
        else "-"
      )
      calls = r["dispatches_per_step"]
      cells = [
        name + (f" ({calls} calls)" if calls > 1 else ""),
        f"{r['median_ms']:.3f} [{r['p25_ms']:.3f}-{r['p75_ms']:.3f}]",
        "" if over is None else f"{over:+.3f}",
        "" if over is None else f"{r['overhead_over_floor']:.2f}x",
        f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-",
        xla_s,
        str(sum(x["fusions"] for x in xla)) if xla else "-",
      ]
      out.append("| " + " | ".join(cells) + " |")
  out += ["", "Targets: `" + json.dumps(report["targets"]) + "`"]
  return "\n".join(out) + "\n"


def targets(report: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
  """The performance targets, evaluated on this run (None where a row is missing)."""
  sizes = report["sizes"]
  largest = max(sizes, key=lambda k: sizes[k]["num_params"])
  big = sizes[largest]["rows"]
  out: dict[str, Any] = {"largest_size": largest}

  def get(size: str, name: str, key: str) -> Any:
    return sizes[size]["rows"].get(name, {}).get(key)

  ours = get(largest, OURS, "overhead_over_floor")
  out["overhead_over_floor_at_largest"] = ours
  out["overhead_over_floor_le_1.05"] = None if ours is None else ours <= 1.05
  others = {
    r.name: big[r.name]["overhead_over_floor"]
    for r in rows
    if r.name in big
    and "overhead_over_floor" in big[r.name]
    and r.name != OURS
    and r.group != "offload"
    and "update_every" not in r.name
    and "decays" not in r.name
  }
  out["other_overheads_over_floor_at_largest"] = others
  if others and ours is not None:
    out["no_worse_than_best_other"] = ours <= min(others.values())
  if "1M" in sizes:
    over = get("1M", OURS, "overhead_ms")
    out["overhead_ms_at_1M"] = over
    out["overhead_le_0.25ms_at_1M"] = None if over is None else over <= 0.25
  every = get(largest, OURS_EVERY, "overhead_over_floor")
  out["update_every_overhead_over_floor"] = every
  out["update_every_le_0.15"] = None if every is None else every <= 0.15
  for name in (OFFLOAD, OFFLOAD_EVERY):  # on CPU host and device are one RAM
    out[f"{name} overhead_over_floor"] = get(largest, name, "overhead_over_floor")
  out["retraces_after_first_step"] = {
    size: sum(r["traces_after_warmup"] for r in block["rows"].values())
    for size, block in sizes.items()
  }
  out["dispatches_per_step_ours"] = get(largest, OURS, "dispatches_per_step")
  mem_ours = (big.get(OURS) or {}).get("memory", {})
  mem_adam = (big.get(ADAM) or {}).get("memory", {})
  param_bytes = sizes[largest]["param_bytes"]
  if "peak_rss_mb" in mem_ours and "peak_rss_mb" in mem_adam:
    extra = (mem_ours["peak_rss_mb"] - mem_adam["peak_rss_mb"]) * 2**20 / param_bytes
    out["extra_peak_rss_over_param_bytes"] = extra
    out["extra_peak_rss_le_1.05"] = extra <= 1.05
  if mem_ours.get("xla") and mem_adam.get("xla"):
    out["extra_xla_argument_over_param_bytes"] = (
      mem_ours["xla"][0]["argument_bytes"] - mem_adam["xla"][0]["argument_bytes"]
    ) / param_bytes
    out["xla_temp_bytes_ours"] = mem_ours["xla"][0]["temp_bytes"]
    out["kernels_adam_vs_ours"] = [
      mem_adam["xla"][0]["fusions"],
      mem_ours["xla"][0]["fusions"],
    ]
  return out


def run(args: argparse.Namespace) -> dict[str, Any]:
  def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

  started = time.perf_counter()
  rows = all_rows()
  if args.rows:
    wanted = set(args.rows.split(","))
    rows = [
      r for r in rows if r.name in wanted or r.group in wanted or r.kind != "step"
    ]
  names = {r.name for r in rows}
  report: dict[str, Any] = {
    "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
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
  report["config"]["check_sizes"] = check_sizes
  report["config"]["memory_sizes"] = memory_sizes
  rss: dict[str, Any] = {}
  if not args.no_memory:
    for row in rows:
      rss[row.name] = measure_memory(row, memory_sizes)
    elapsed = time.perf_counter() - started
    log(f"peak RSS measured in {len(rows)} fresh processes ({elapsed:.0f} s)")
  for size in sizes:
    n = num_params(size)
    what = f"checking {len(rows)} rows" if size in check_sizes else "compiling"
    log(f"{size}: {n:,} params in {num_leaves(size)} leaves; {what}")
    runners = {row.name: row.make(size) for row in rows}
    checks, xla = [], {}
    for row in rows:
      if size in check_sizes:
        checks.append(check_row(row, size, runner=runners[row.name]))
      state = runners[row.name].init()
      xla[row.name] = runners[row.name].memory(state)
      del state
    log(f"  {size}: ready ({time.perf_counter() - started:.0f} s)")
    steps = args.steps if args.steps else max(5, min(100, int(1e8 / n)))
    timed = time_rows(rows, runners, size, args.rounds, steps, log)
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
    floor = block["rows"][FLOOR]["median_ms"]
    block["floor_ms"] = floor
    block["scale_gbs"] = 8 * n / block["rows"][SCALE]["median_ms"] / 1e6
    block["triad_gbs"] = 12 * n / block["rows"][TRIAD]["median_ms"] / 1e6
    for row in rows:
      r = block["rows"][row.name]
      if row.baseline is not None and row.baseline in names:
        over = r["median_ms"] - block["rows"][row.baseline]["median_ms"]
        r["overhead_ms"] = over
        r["overhead_over_floor"] = over / floor
    report["sizes"][size] = block
    del runners
    gc.collect()
  report["targets"] = targets(report, rows)
  report["wall_s"] = time.perf_counter() - started
  return report


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
  parser.add_argument(
    "--out",
    default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "bench_ema.json"
    ),
  )
  parser.add_argument(
    "--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS
  )
  args = parser.parse_args(argv)
  if args.memory_child:
    print(json.dumps(memory_child(args.memory_child, args.sizes.split(","))))
    return
  if args.quick:
    args.sizes, args.rounds, args.steps = "64K", 2, 5
  report = run(args)
  table = build_table(report)
  m = report["machine"]
  head = (
    f"optax_ema benchmark, {report['date_utc']}, {m['cpu']} ({m['cores']} cores, "
    f"{m['memory_gb']} GB), jax {m['versions']['jax']}, load at start "
    f"{m['loadavg_at_start'][0]:.2f}\ncommand: {report['command']}; "
    f"wall {report['wall_s']:.0f} s"
  )
  table += "\n\ntargets: " + json.dumps(report["targets"], indent=1)
  print(head + table)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
      f.write(head + table + "\n")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
      f.write(build_markdown(report))


if __name__ == "__main__":
  main()
