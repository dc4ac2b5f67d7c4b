"""optax_ema.diagnostics against values computed by hand / with NumPy.

The state records the step size of its last averaging step, so diagnostics
needs no transformation and finds the state wherever it sits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import schedules

import helpers


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
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = jax.jit(optax_ema.diagnostics)(state, params)
  assert set(stats) == {"count", "drift", "decay", "window"}
  assert int(stats["count"]) == 5
  assert float(stats["decay"]) == pytest.approx(0.9, rel=1e-7)
  assert float(stats["window"]) == pytest.approx(10.0, rel=1e-5)
  avg = optax_ema.averaged_params(state)
  assert float(stats["drift"]) == pytest.approx(_np_drift(avg, params), rel=1e-5)


@pytest.mark.parametrize(
  "wrap",
  [
    lambda tx: optax.chain(optax.clip(10.0), tx),
    lambda tx: optax.named_chain(("clip", optax.clip(10.0)), ("ema", tx)),
    lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
    lambda tx: {"nested": [tx]},
  ],
  ids=["chain", "named_chain", "MultiSteps", "pytree"],
)
def test_finds_the_state_wherever_it_sits(wrap):
  ema = optax_ema.moving_average(optax.sgd(0.5), 0.8)
  if isinstance(wrap(ema), dict):  # a pytree holding a state, not a transform
    _, state = helpers.run(ema, PARAMS, GRADS[:2], jit=False)
    params = PARAMS
    opt_state = wrap(state)
  else:
    params, opt_state = helpers.run(wrap(ema), PARAMS, GRADS[:2], jit=False)
  stats = optax_ema.diagnostics(opt_state, params)
  assert int(stats["count"]) == 2
  assert float(stats["decay"]) == pytest.approx(0.8, rel=1e-6)


def test_inside_inject_hyperparams_reports_the_run_time_decay():
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(0.5), average_decay=0.9
  )
  state = tx.init(PARAMS)
  state.hyperparams["average_decay"] = jnp.asarray(0.75, jnp.float32)
  updates, state = tx.update(GRADS[0], state, PARAMS)
  stats = optax_ema.diagnostics(state, optax.apply_updates(PARAMS, updates))
  assert float(stats["decay"]) == pytest.approx(0.75, rel=1e-6)
  assert float(stats["window"]) == pytest.approx(4.0, rel=1e-5)


def test_decay_is_the_one_used_at_the_last_step_under_a_schedule():
  tx = optax_ema.moving_average(optax.sgd(0.5), schedules.tf_ramp(0.999))
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = optax_ema.diagnostics(state, params)
  # Last step had count 4 before it: (1 + 4) / (10 + 4).
  assert float(stats["decay"]) == pytest.approx(5 / 14, rel=1e-6)
  assert float(stats["window"]) == pytest.approx(14 / 9, rel=1e-5)


def test_before_any_step_decay_is_zero_and_drift_is_zero():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.99)
  stats = optax_ema.diagnostics(tx.init(PARAMS), PARAMS)
  assert int(stats["count"]) == 0
  assert float(stats["decay"]) == 0.0
  assert float(stats["window"]) == 1.0
  assert float(stats["drift"]) == 0.0


def test_update_every_reports_the_per_step_decay_and_window_in_steps():
  # Every 2nd step the average moves by 0.9**2: per step, 0.9 and 10 steps.
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.9, update_every=2)
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = optax_ema.diagnostics(state, params)
  assert float(stats["decay"]) == pytest.approx(float(np.float32(0.9)), rel=1e-6)
  assert float(stats["window"]) == pytest.approx(10.0, rel=1e-5)


def test_several_averages_get_one_entry_each_or_the_one_picked():
  tx = optax_ema.moving_average(
    optax.sgd(0.5), {"fast": 0.5, "slow": 0.99}, debias=True
  )
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = optax_ema.diagnostics(state, params)
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
  picked = optax_ema.diagnostics(state, params, which="fast")
  assert set(picked) == {"count", "drift", "decay", "window"}
  assert float(picked["decay"]) == pytest.approx(0.5)


def test_per_leaf_decays_get_one_entry_per_leaf():
  tx = optax_ema.moving_average(
    optax.sgd(0.5), schedules.per_leaf({"a": 0.9, "b": 0.5})
  )
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = optax_ema.diagnostics(state, params)
  assert float(stats["decay['a']"]) == pytest.approx(0.9)
  assert float(stats["window['b']['c']"]) == pytest.approx(2.0)


def test_power_ema_profiles_report_the_power_decay_of_the_last_update():
  # After t = 5 updates the last one used (1 - 1/5) ** (gamma + 1).
  tx = optax_ema.power_ema(optax.sgd(0.5), sigma_rels=(0.05, 0.1))
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = optax_ema.diagnostics(state, params)
  for key, sigma_rel in (("0.05", 0.05), ("0.1", 0.1)):
    gamma = optax_ema.posthoc.sigma_rel_to_gamma(sigma_rel)
    decay = (1 - 1 / 5) ** (gamma + 1)
    assert float(stats[f"decay/{key}"]) == pytest.approx(decay, rel=1e-5)
    assert float(stats[f"window/{key}"]) == pytest.approx(1 / (1 - decay), rel=1e-5)


def test_swa_reports_the_mean_spread_over_its_period():
  # Snapshots at updates 1, 3, 5 (start 0, period 2): the last one entered a
  # mean of 3 with weight 1/3, i.e. per step 1 - (2/3) ** (1/2).
  tx = optax_ema.swa(optax.sgd(0.5), start_averaging=0, average_period=2)
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  stats = optax_ema.diagnostics(state, params)
  w = 1 - (2 / 3) ** 0.5
  assert float(stats["decay"]) == pytest.approx(1 - w, rel=1e-6)
  assert float(stats["window"]) == pytest.approx(1 / w, rel=1e-5)


def test_masked_and_bf16_leaves_in_drift():
  params = {"w": jnp.array([2.0, 2.0], jnp.bfloat16), "frozen": jnp.array([100.0])}
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.5, mask={"w": True, "frozen": False})
  grads = {"w": jnp.array([1.0, 1.0], jnp.bfloat16), "frozen": jnp.array([0.0])}
  params, state = helpers.run(tx, params, [grads], jit=False)
  stats = optax_ema.diagnostics(state, params)
  # Average 1.5, params 1.0 on the averaged leaf only: |0.5, 0.5| / |1, 1|.
  assert float(stats["drift"]) == pytest.approx(0.5, rel=1e-6)


def test_passing_tx_is_deprecated_and_changes_nothing():
  tx = optax_ema.moving_average(optax.sgd(0.5), 0.9)
  params, state = helpers.run(tx, PARAMS, GRADS, jit=False)
  with pytest.warns(DeprecationWarning, match="no longer needs `tx`"):
    with_tx = optax_ema.diagnostics(state, params, tx)
  without = optax_ema.diagnostics(state, params)
  assert jax.tree.map(float, with_tx) == jax.tree.map(float, without)
