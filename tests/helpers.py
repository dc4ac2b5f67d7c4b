"""Helpers shared by the tests: small trees, training loops, NumPy references.

Expected values in the tests come from these few lines of NumPy written from
the update rules (never from the code under test):

- EMA: ``average <- average - (average - x) * (1 - decay)``, ``x`` the params
  after the step (TFA's ``sequential_update=True``), the decay a float32
  number as the library's;
- SGD: ``params <- params - lr * grads``.

The EMA is written once (``np_ema_step``); the other references build on it.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Explicit dtypes: a weakly typed scalar would turn strong after a step and
# retrace on its own.


def params():
  """A small float32 tree: a vector, a matrix and a scalar."""
  return {
    "a": jnp.array([1.0, 2.0], jnp.float32),
    "b": {"c": jnp.array([[0.5, -3.0, 1.5]], jnp.float32)},
    "s": jnp.array(-1.0, jnp.float32),
  }


def grads(steps: int, seed: int = 0, like: Any = None) -> list[Any]:
  """``steps`` deterministic gradient trees shaped like ``like`` (or params())."""
  rng = np.random.default_rng(seed)
  like = params() if like is None else like
  return [
    jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=np.shape(x)), jnp.asarray(x).dtype),
      like,
    )
    for _ in range(steps)
  ]


def run(tx: Any, params: Any, grads_seq: Any, *, jit: bool = True) -> tuple[Any, Any]:
  """``(params, state)`` after training with ``tx`` on ``grads_seq``."""
  params, state, _ = run_recording(tx, params, grads_seq, jit=jit)
  return params, state


def run_recording(
  tx: Any,
  params: Any,
  grads_seq: Any,
  record: Any = lambda params, state, updates: params,
  *,
  jit: bool = True,
) -> tuple[Any, Any, list[Any]]:
  """``(params, state, history)``: ``record(params, state, updates)`` each step."""
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = []
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append(record(params, state, updates))
  return params, state, history


def as_np(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_sgd(params: Any, grads_seq: Any, lr: float) -> list[Any]:
  """The params after each SGD step, in float64."""
  p = as_np(params)
  out = []
  for g in grads_seq:
    p = jax.tree.map(lambda x, y: x - lr * np.asarray(y, np.float64), p, g)
    out.append(p)
  return out


def np_ema_step(average: Any, x: Any, decay: float) -> Any:
  """One EMA step in float64, ``decay`` rounded to float32 first."""
  d = float(np.float32(decay))
  return jax.tree.map(
    lambda a, y: a - (a - np.asarray(y, np.float64)) * (1.0 - d), average, x
  )


def np_ema(start: Any, values: Any, decays: Any) -> Any:
  """The EMA of ``values`` from ``start``, one (float32-rounded) decay each."""
  a = as_np(start)
  for x, d in zip(values, decays, strict=True):
    a = np_ema_step(a, x, d)
  return a


def np_sgd_ema(params: Any, grads_seq: Any, lr: float, decay: float) -> tuple:
  """``(params, average)`` after SGD on ``grads_seq``, averaging after each step."""
  trajectory = np_sgd(params, grads_seq, lr)
  return trajectory[-1], np_ema(params, trajectory, [decay] * len(trajectory))


def np_run_emas(
  trajectory: Any,
  decays: Any,
  *,
  convention: str = "copy",
  update_every: int = 1,
) -> list[Any]:
  """The EMAs a training run's parameters should have, one per decay.

  Args:
    trajectory: the parameters before step 1, after step 1, after step 2...
      (any iterable: it is read once, so a generator keeps one step in memory).
    decays: the decay of each average.
    convention: ``"copy"``, TFA's and optax_ema's: an average starts at the
      parameters before step 1; ``"keras"``: step 1 copies the new parameters
      into it (Keras' ``use_ema``).
    update_every: ``k``: an average moves only after steps ``k, 2k, ...``,
      with the decay of ``k`` steps, ``decay ** k``.

  Returns:
    The averages in float64, one tree shaped like a step's parameters per
    decay.
  """
  steps = iter(trajectory)
  averages = [as_np(next(steps))] * len(decays)  # each step makes new trees
  for t, x in enumerate(steps, start=1):
    if convention == "keras" and t == 1:
      averages = [np_ema_step(a, x, 0.0) for a in averages]
    elif t % update_every == 0:
      averages = [
        np_ema_step(a, x, d**update_every)
        for a, d in zip(averages, decays, strict=True)
      ]
  return averages


def assert_tree_close(got: Any, want: Any, rtol: float = 1e-6, atol: float = 1e-7):
  got_leaves, got_def = jax.tree.flatten(got)
  want_leaves, want_def = jax.tree.flatten(want)
  assert got_def == want_def, (got_def, want_def)
  for g, w in zip(got_leaves, want_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


def assert_trees_identical(a: Any, b: Any) -> None:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its body lines, from an HLO module's text."""
  out: dict[str, list[str]] = {}
  name = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if header:
      name = header.group(1)
      out[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      out[name].append(line.strip())
  return out


def conditional_branches(hlo_text: str) -> list[set[str]]:
  """For each ``conditional`` of a compiled module, the opcodes of its branches."""
  comps = computations(hlo_text)
  out = []
  for body in comps.values():
    for line in body:
      if " conditional(" not in line:
        continue
      found = re.search(r"branch_computations=\{([^}]*)\}", line)
      names = [n.strip().lstrip("%") for n in found.group(1).split(",")]
      out.append(
        [
          {m.group(1) for x in comps[n] if (m := re.search(r"= \S+ ([\w\-]+)\(", x))}
          for n in names
        ]
      )
  return out


FORWARDING = {"parameter", "tuple", "get-tuple-element"}
