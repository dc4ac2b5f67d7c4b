"""optax_ema.diagnostics against values computed by hand / with NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import schedules


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _np_drift(avg, params):
  a = np.concatenate(
    [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(avg)]
  )
  p = np.concatenate(
    [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)]
  )
  return np.linalg.norm(a - p) / np.linalg.norm(p)


PARAMS = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[0.5, 3.0]])}}
GRADS = [
  jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), PARAMS) for i in range(5)
]


def test_values_for_a_constant_decay_match_numpy():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.9)
  params, state = _run(tx, PARAMS, GRADS)
  stats = jax.jit(lambda s, p: optax_ema.diagnostics(s, p, tx))(state, params)
  assert set(stats) == {"count", "drift", "decay", "window"}
  assert int(stats["count"]) == 5
  assert float(stats["decay"]) == pytest.approx(0.9, rel=1e-7)
  assert float(stats["window"]) == pytest.approx(10.0, rel=1e-5)
  avg = optax_ema.averaged_params(state)
  assert float(stats["drift"]) == pytest.approx(_np_drift(avg, params), rel=1e-5)


def test_decay_is_the_one_used_at_the_last_step_under_a_schedule():
  tx = optax_ema.moving_average(optax.sgd(0.5), schedules.tf_ramp(0.999))
  params, state = _run(tx, PARAMS, GRADS)
  stats = optax_ema.diagnostics(state, params, tx)
  # Last step had count 4 before it: (1 + 4) / (10 + 4).
  assert float(stats["decay"]) == pytest.approx(5 / 14, rel=1e-6)
  assert float(stats["window"]) == pytest.approx(14 / 9, rel=1e-5)


def test_before_any_step_decay_is_zero_and_drift_is_zero():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.99)
  stats = optax_ema.diagnostics(tx.init(PARAMS), PARAMS, tx)
  assert int(stats["count"]) == 0
  assert float(stats["decay"]) == 0.0
  assert float(stats["window"]) == 1.0
  assert float(stats["drift"]) == 0.0


def test_without_tx_only_count_and_drift():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.9)
  params, state = _run(tx, PARAMS, GRADS[:2])
  stats = optax_ema.diagnostics({"nested": (optax.EmptyState(), state)}, params)
  assert set(stats) == {"count", "drift"}


def test_update_every_reports_the_compensated_decay_and_window_in_steps():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.9, update_every=2)
  params, state = _run(tx, PARAMS, GRADS)
  stats = optax_ema.diagnostics(state, params, tx)
  d2 = float(np.float32(0.9)) ** 2
  assert float(stats["decay"]) == pytest.approx(d2, rel=1e-6)
  assert float(stats["window"]) == pytest.approx(2 / (1 - d2), rel=1e-5)


def test_several_averages_get_one_entry_each_or_the_one_picked():
  tx = optax_ema.moving_average(
    optax.sgd(0.5), {"fast": 0.5, "slow": 0.99}, debias=True
  )
  params, state = _run(tx, PARAMS, GRADS)
  stats = optax_ema.diagnostics(state, params, tx)
  assert set(stats) == {
    "count",
    "drift/fast",
    "drift/slow",
    "decay/fast",
    "decay/slow",
    "window/fast",
    "window/slow",
  }
  assert float(stats["window/slow"]) == pytest.approx(100.0, rel=1e-4)
  slow = optax_ema.averaged_params(state, which="slow")
  assert float(stats["drift/slow"]) == pytest.approx(_np_drift(slow, params), rel=1e-5)
  picked = optax_ema.diagnostics(state, params, tx, which="fast")
  assert set(picked) == {"count", "drift", "decay", "window"}
  assert float(picked["decay"]) == pytest.approx(0.5)


def test_per_leaf_decays_get_one_entry_per_leaf():
  tx = optax_ema.moving_average(
    optax.sgd(0.5), schedules.per_leaf({"a": 0.9, "b": 0.5})
  )
  params, state = _run(tx, PARAMS, GRADS)
  stats = optax_ema.diagnostics(state, params, tx)
  assert float(stats["decay['a']"]) == pytest.approx(0.9)
  assert float(stats["window['b']['c']"]) == pytest.approx(2.0)


def test_masked_and_bf16_leaves_in_drift():
  params = {"w": jnp.array([2.0, 2.0], jnp.bfloat16), "frozen": jnp.array([100.0])}
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.5, mask={"w": True, "frozen": False})
  grads = {"w": jnp.array([1.0, 1.0], jnp.bfloat16), "frozen": jnp.array([0.0])}
  params, state = _run(tx, params, [grads])
  stats = optax_ema.diagnostics(state, params)
  # Average 1.5, params 1.0 on the averaged leaf only: |0.5, 0.5| / |1, 1|.
  assert float(stats["drift"]) == pytest.approx(0.5, rel=1e-6)


def test_tx_that_is_not_moving_average_is_a_clear_error():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.9)
  state = tx.init(PARAMS)
  with pytest.raises(TypeError, match="`tx` must be the transformation"):
    optax_ema.diagnostics(state, PARAMS, optax.chain(tx))
  other = optax_ema.moving_average(optax.sgd(0.5), (0.9, 0.99))
  with pytest.raises(ValueError, match="`tx` does not match"):
    optax_ema.diagnostics(state, PARAMS, other)
