"""Helpers shared by the tests: small trees, training loops, NumPy references.

Expected values in the tests come from these few lines of NumPy written from
the update rules (never from the code under test):

- EMA: ``average <- average - (average - x) * (1 - decay)``, ``x`` the params
  after the step (TFA's ``sequential_update=True``);
- SGD: ``params <- params - lr * grads``.
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


def np_ema(start: Any, values: Any, decays: Any) -> Any:
  """The EMA of ``values`` from ``start``, one (float32-rounded) decay each."""
  a = as_np(start)
  for x, d in zip(values, decays, strict=True):
    d = float(np.float32(d))
    a = jax.tree.map(lambda a_, x_, d=d: a_ - (a_ - x_) * (1.0 - d), a, x)
  return a


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
