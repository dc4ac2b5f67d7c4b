"""update_every=k against a NumPy restatement, and its compiled step.

Reference rule (float64, decays rounded to float32): at count t the average
moves only when (t + 1) % k == 0, by D = prod(d(j) for j in t-k+1 .. t) with
d(j) the TFA per-step decay (0 before start_step); the other steps leave it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers

LR = 0.2


def _grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{"w": rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(steps)]


def _params():
  return {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}


def _np_reference(params, grads, k, decay_at, start_step=0):
  p = params["w"].astype(np.float64)
  a = p.copy()
  per_step = [
    0.0 if t < start_step else float(np.float32(decay_at(t))) for t in range(len(grads))
  ]
  history = []
  for t, g in enumerate(grads):
    p = p - LR * g["w"]
    if (t + 1) % k == 0:
      big_d = float(np.prod(per_step[t - k + 1 : t + 1]))
      a = big_d * a + (1 - big_d) * p
    history.append(a.copy())
  return history


def _run(tx, params, grads, which=None):
  """(the average of "w" after each step, the final state)."""

  def record(params, state, updates):
    return np.asarray(optax_ema.averaged_params(state, which=which)["w"])

  _, state, history = helpers.run_recording(tx, params, grads, record)
  return history, state


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize(
  "decay, decay_at, start_step",
  [
    (0.9, lambda t: 0.9, 0),
    (0.8, lambda t: 0.8, 4),
    (
      lambda c: jnp.minimum(0.5 + 0.01 * c.astype(jnp.float32), 0.95),
      lambda t: min(0.5 + 0.01 * t, 0.95),
      0,
    ),
  ],
)
def test_update_every_matches_numpy_reference(k, decay, decay_at, start_step):
  grads = _grads(16)
  tx = optax_ema.moving_average(
    optax.sgd(LR), decay, update_every=k, start_step=start_step
  )
  history, _ = _run(tx, _params(), grads)
  want = _np_reference(_params(), grads, k, decay_at, start_step)
  for got, ref in zip(history, want, strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_update_every_one_equals_the_default():
  grads = _grads(7)
  plain, _ = _run(optax_ema.moving_average(optax.sgd(LR), 0.7), _params(), grads)
  one, _ = _run(
    optax_ema.moving_average(optax.sgd(LR), 0.7, update_every=1), _params(), grads
  )
  for a, b in zip(plain, one, strict=True):
    np.testing.assert_array_equal(a, b)
  want = _np_reference(_params(), grads, 1, lambda t: 0.7)
  np.testing.assert_allclose(plain[-1], want[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_window_in_steps_does_not_depend_on_k(k):
  # Params jump once (first step) and then stay: after N steps, N a multiple
  # of k, the average is x1 + (x0 - x1) * d**N for every k.
  decay, steps = 0.95, 40
  params = {"w": jnp.zeros(3)}
  grads = [{"w": -jnp.ones(3)}] + [{"w": jnp.zeros(3)}] * (steps - 1)
  tx = optax_ema.moving_average(optax.sgd(1.0), decay, update_every=k)
  history, _ = _run(tx, params, grads)
  want = 1.0 - np.float32(decay).astype(np.float64) ** steps
  np.testing.assert_allclose(history[-1], np.full(3, want), rtol=2e-6)


def test_skipped_steps_leave_the_average_bit_identical():
  tx = optax_ema.moving_average(optax.sgd(LR), 0.9, update_every=3)
  history, state = _run(tx, _params(), _grads(6))
  np.testing.assert_array_equal(history[0], _params()["w"])
  np.testing.assert_array_equal(history[1], _params()["w"])
  assert not np.array_equal(history[2], _params()["w"])
  np.testing.assert_array_equal(history[3], history[2])
  np.testing.assert_array_equal(history[4], history[2])
  assert int(state.count) == 6


def test_skipped_steps_touch_no_average_memory_in_the_compiled_step():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.99, update_every=4)
  params = {"w": jnp.ones((64, 32))}
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  text = compiled.as_text()
  comps = helpers.computations(text)
  conds = [line for body in comps.values() for line in body if " conditional(" in line]
  assert len(conds) == 1, conds
  branches = re.search(r"branch_computations=\{%?([\w.\-]+), %?([\w.\-]+)\}", conds[0])
  bodies = [comps[branches.group(1)], comps[branches.group(2)]]
  trivial = {"parameter", "tuple", "get-tuple-element"}

  def opcodes(body):
    return {m.group(1) for line in body if (m := re.search(r"= \S+ ([\w\-]+)\(", line))}

  kinds = [opcodes(b) for b in bodies]
  # One branch only forwards the average (no arithmetic, no copy) ...
  assert any(k <= trivial for k in kinds), kinds
  # ... the other does the averaging.
  assert any(k - trivial for k in kinds), kinds
  # And the average is an input/output alias of the step (no copy of it).
  assert "input_output_alias" in text
  # Nothing parameter-sized is copied into the conditional: the step needs no
  # temporary buffer of the parameters' size (passing params and updates as
  # cond operands used to cost two).
  param_bytes = 64 * 32 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < param_bytes // 4


def test_update_every_with_debias_and_several_decays_matches_numpy():
  grads = _grads(9, seed=3)
  tx = optax_ema.moving_average(
    optax.sgd(LR), {"fast": 0.5, "slow": 0.9}, update_every=3, debias=True
  )
  _, state = _run(tx, _params(), grads, which="slow")
  for key, d in (("fast", 0.5), ("slow", 0.9)):
    p = _params()["w"].astype(np.float64)
    a, w = np.zeros_like(p), 0.0
    big_d = float(np.float32(d)) ** 3
    for t, g in enumerate(grads):
      p = p - LR * g["w"]
      if (t + 1) % 3 == 0:
        a = big_d * a + (1 - big_d) * p
        w = big_d * w + (1 - big_d)
    got = optax_ema.averaged_params(state, which=key)["w"]
    np.testing.assert_allclose(got, a / w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "value, err",
  [
    (0, ValueError),
    (-2, ValueError),
    (1.5, TypeError),
    (True, TypeError),
    ("2", TypeError),
  ],
)
def test_bad_update_every_raises(value, err):
  with pytest.raises(err, match="`update_every`"):
    optax_ema.moving_average(optax.sgd(1.0), 0.9, update_every=value)


def test_update_every_with_skip_nonfinite_ignores_a_nan_step():
  tx = optax_ema.moving_average(
    optax.sgd(LR), (0.5, 0.9), update_every=2, skip_nonfinite=True
  )
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones((4, 3))}, state, params)
  before = jax.tree.map(np.asarray, state.average)
  _, state = tx.update({"w": jnp.full((4, 3), jnp.nan)}, state, params)
  for got, want in zip(
    jax.tree.leaves(state.average), jax.tree.leaves(before), strict=True
  ):
    np.testing.assert_array_equal(got, want)
  assert int(state.count) == 1
