"""optax_ema.swa: stochastic weight averaging with TFA's rule.

Expected values come from TFA's published test numbers and from NumPy written
from the rule: at step t >= s with (t - s) % P == 0, k = (t - s) // P and
average = (average * k + p) / (k + 1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema


def _numpy_swa(p0, grads, lr, start, period):
  """Plain-SGD parameters and their SWA average after each step (NumPy)."""
  p = np.array(p0, np.float64)
  average = p.copy()
  history = []
  for t, g in enumerate(grads):
    p = p - lr * np.asarray(g, np.float64)
    if t < start:
      average = p.copy()  # before the first snapshot: the current params
    elif (t - start) % period == 0:
      k = (t - start) // period
      average = (average * k + p) / (k + 1)
    history.append((p.copy(), average.copy()))
  return history


def test_upstream_tfa_averaging():
  params = [jnp.array([1.0, 1.0]), jnp.array([2.0, 2.0])]
  tx = optax_ema.swa(optax.sgd(1.0), 0, 1)
  state = tx.init(params)
  for _ in range(3):
    grads = [jnp.array([0.1, 0.1]), jnp.array([0.1, 0.1])]
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params[0], [0.7, 0.7], rtol=1e-6)
  np.testing.assert_allclose(params[1], [1.7, 1.7], rtol=1e-6)
  average = optax_ema.averaged_params(state)
  np.testing.assert_allclose(average[0], [0.8, 0.8], rtol=1e-6)
  np.testing.assert_allclose(average[1], [1.8, 1.8], rtol=1e-6)


@pytest.mark.parametrize(("start", "period"), [(0, 1), (0, 3), (3, 2), (5, 4)])
def test_matches_numpy_rule(start, period):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(12, 3)).astype(np.float32)
  p0 = np.array([1.0, -2.0, 0.5], np.float32)
  params = jnp.asarray(p0)
  tx = optax_ema.swa(optax.sgd(0.1), start, period)
  state = tx.init(params)
  expected = _numpy_swa(p0, grads, 0.1, start, period)
  for g, (p_ref, avg_ref) in zip(grads, expected, strict=True):
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, p_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      optax_ema.averaged_params(state), avg_ref, rtol=1e-5, atol=1e-6
    )


def test_averaged_params_before_first_snapshot_are_the_current_params():
  params = {"w": jnp.array([1.0, 2.0])}
  tx = optax_ema.swa(optax.sgd(0.5), start_averaging=3, average_period=5)
  state = tx.init(params)
  np.testing.assert_array_equal(optax_ema.averaged_params(state)["w"], params["w"])
  for _ in range(2):
    updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(optax_ema.averaged_params(state)["w"], params["w"])
  np.testing.assert_allclose(params["w"], [0.0, 3.0])


def test_updates_are_the_inner_optimizers():
  params = {"w": jnp.array([1.0, 2.0])}
  grads = {"w": jnp.array([0.3, -0.4])}
  tx = optax_ema.swa(optax.adam(0.1), 0, 2)
  updates, _ = tx.update(grads, tx.init(params), params)
  reference = optax.adam(0.1)
  expected, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_array_equal(updates["w"], expected["w"])


def test_found_inside_chain_and_inject_hyperparams():
  params = {"w": jnp.array([1.0, 2.0])}
  tx = optax.chain(optax.clip(10.0), optax_ema.swa("sgd", 0, 1, learning_rate=1.0))
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([0.5, 0.5])}, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(optax_ema.averaged_params(state)["w"], [0.5, 1.5])


def test_averaged_params_casts_to_param_dtypes_and_keeps_float32_average():
  params = {"w": jnp.array([1.0, 2.0], jnp.bfloat16)}
  tx = optax_ema.swa(optax.sgd(0.25), 0, 1)
  state = tx.init(params)
  assert state.average["w"].dtype == jnp.float32
  updates, state = tx.update({"w": jnp.ones(2, jnp.bfloat16)}, state, params)
  params = optax.apply_updates(params, updates)
  average = optax_ema.averaged_params(state, params)
  assert average["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(average["w"], np.float32), [0.75, 1.75])


def test_float64_parameters_work():
  with jax.enable_x64(True):
    p0 = np.array([1.0 + 1e-12, 2.0], np.float64)
    grads = np.array([[1e-13, 0.5], [3e-13, 0.25], [2e-13, 0.125]])
    params = jnp.asarray(p0)
    tx = optax_ema.swa(optax.sgd(1.0), 0, 1)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(jnp.asarray(g), state, params)
      params = optax.apply_updates(params, updates)
    average = optax_ema.averaged_params(state)
    assert average.dtype == jnp.float64
    expected = _numpy_swa(p0, grads, 1.0, 0, 1)[-1][1]
    np.testing.assert_allclose(np.asarray(average), expected, rtol=1e-15)


def test_non_float_and_none_leaves():
  params = {"w": jnp.array([1.0]), "n": jnp.array([3], jnp.int32), "z": None}
  tx = optax_ema.swa(optax.sgd(1.0), 0, 2)
  state = tx.init(params)
  grads = {"w": jnp.array([1.0]), "n": jnp.array([0], jnp.int32), "z": None}
  _, state = tx.update(grads, state, params)
  assert state.average["z"] is None
  assert state.average["n"].dtype == jnp.int32
  np.testing.assert_array_equal(state.average["n"], [3])
  np.testing.assert_allclose(state.average["w"], [0.0])


def test_scan_matches_python_loop():
  params = jnp.array([1.0, -1.0])
  grads = jnp.asarray(np.random.default_rng(1).normal(size=(7, 2)), jnp.float32)
  tx = optax_ema.swa(optax.sgd(0.1, momentum=0.9), 2, 2)

  def step(carry, g):
    params, state = carry
    updates, state = tx.update(g, state, params)
    return (optax.apply_updates(params, updates), state), None

  (p_scan, s_scan), _ = jax.lax.scan(step, (params, tx.init(params)), grads)
  carry = (params, tx.init(params))
  for g in grads:
    carry, _ = step(carry, g)
  np.testing.assert_allclose(p_scan, carry[0], rtol=1e-6)
  np.testing.assert_allclose(s_scan.average, carry[1].average, rtol=1e-6)
  assert int(s_scan.count) == 7


def test_multisteps_only_averages_on_real_steps():
  params = jnp.array([1.0])
  tx = optax.MultiSteps(optax_ema.swa(optax.sgd(1.0), 0, 1), every_k_schedule=2)
  state = tx.init(params)
  for g in [0.2, 0.4, 0.1, 0.3]:
    updates, state = tx.update(jnp.array([g]), state, params)
    params = optax.apply_updates(params, updates)
  # Two real steps with mean gradients 0.3 then 0.2: params 0.7 then 0.5.
  np.testing.assert_allclose(params, [0.5], rtol=1e-6)
  np.testing.assert_allclose(optax_ema.averaged_params(state), [0.6], rtol=1e-6)


def test_needs_params():
  tx = optax_ema.swa(optax.sgd(1.0))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"tx.update\(grads, state, params\)"):
    tx.update({"w": jnp.ones(2)}, state)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"average_period": 0}, ValueError, "`average_period` must be an int >= 1"),
    ({"start_averaging": -1}, ValueError, "`start_averaging` must be an int >= 0"),
    ({"average_period": 2.5}, TypeError, "`average_period` must be an int"),
    ({"start_averaging": True}, TypeError, "`start_averaging` must be an int"),
  ],
)
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_ema.swa(optax.sgd(1.0), **kwargs)


def test_by_name_with_optimizer_arguments():
  params = jnp.array([1.0])
  tx = optax_ema.swa("sgd", 0, 1, learning_rate=0.5, momentum=0.5)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jnp.array([1.0]), state, params)
    params = optax.apply_updates(params, updates)
  # Momentum traces 1, 1.5: params 0.5, -0.25; snapshots average them.
  np.testing.assert_allclose(params, [-0.25])
  np.testing.assert_allclose(optax_ema.averaged_params(state), [0.125])


def test_extra_args_are_forwarded_and_unknown_ones_accepted():
  params = jnp.array([1.0])
  tx = optax_ema.swa(optax.sgd(1.0), 0, 1)
  state = tx.init(params)
  updates, state = tx.update(jnp.array([0.5]), state, params, unused_extra=3)
  np.testing.assert_allclose(updates, [-0.5])


def test_tree_map_params_reaches_the_average():
  params = {"w": jnp.ones(2)}
  tx = optax_ema.swa(optax.sgd(1.0, momentum=0.9))
  state = tx.init(params)
  specs = optax.tree_map_params(tx, lambda p: "spec", state)
  assert specs.average == {"w": "spec"}
  assert int(specs.count) == 0


def test_apply_if_finite_skips_the_average_on_nan():
  params = jnp.array([1.0])
  tx = optax.apply_if_finite(optax_ema.swa(optax.sgd(1.0), 0, 1), 3)
  state = tx.init(params)
  for g in [0.5, np.nan, 0.25]:
    updates, state = tx.update(jnp.array([g]), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, [0.25])
  np.testing.assert_allclose(optax_ema.averaged_params(state), [0.375])


def test_donated_params_and_state():
  params = {"w": jnp.array([1.0, 2.0])}
  tx = optax_ema.swa(optax.sgd(0.5), 0, 1)
  state = tx.init(params)

  def step(params, state):
    updates, state = tx.update({"w": jnp.ones(2)}, state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  params, state = donated(params, state)
  params, state = donated(params, state)
  np.testing.assert_allclose(params["w"], [0.0, 1.0])
  np.testing.assert_allclose(optax_ema.averaged_params(state)["w"], [0.25, 1.25])


def test_inject_hyperparams_wraps_swa_and_changes_the_period():
  params = jnp.array([1.0])
  tx = optax.inject_hyperparams(optax_ema.swa)(
    optimizer=optax.sgd(1.0), start_averaging=0, average_period=1
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in [0.5, 0.25]:
    updates, state = update(jnp.array([g]), state, params)
    params = optax.apply_updates(params, updates)
  state.hyperparams["average_period"] = jnp.asarray(100, jnp.int32)
  updates, state = update(jnp.array([0.25]), state, params)
  # Snapshots of 0.5 and 0.25; step 2 is not a snapshot with a period of 100.
  np.testing.assert_allclose(optax_ema.averaged_params(state), [0.375])
