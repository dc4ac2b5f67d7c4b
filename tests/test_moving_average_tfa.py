"""The numbers of TensorFlow Addons' MovingAverage tests, reproduced in float32.

Setup of the upstream tests: var0 = [1, 2], var1 = [3, 4], gradients
[0.1, 0.1] and [0.01, 0.01], plain SGD. The expected values are TFA's
published ones; the one-step values in between follow from
``avg - (avg - x) * (1 - decay)`` by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

# "match TFA to ~1e-7" in float32.
TOL = {"rtol": 1e-6, "atol": 1e-7}


def _params():
  return {
    "var0": jnp.array([1.0, 2.0], jnp.float32),
    "var1": jnp.array([3.0, 4.0], jnp.float32),
  }


def _grads():
  return {
    "var0": jnp.array([0.1, 0.1], jnp.float32),
    "var1": jnp.array([0.01, 0.01], jnp.float32),
  }


def _run(tx, num_steps, jit=False):
  """Returns [(params, average)] after each of ``num_steps`` steps."""
  params = _params()
  state = tx.init(params)

  def step(params, state):
    updates, state = tx.update(_grads(), state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  history = []
  for _ in range(num_steps):
    params, state = step(params, state)
    history.append((params, optax_ema.averaged_params(state)))
  return history, state


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_two_steps_match_tfa(jit):
  tx = optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5)
  history, state = _run(tx, 2, jit=jit)
  params, average = history[-1]
  np.testing.assert_allclose(params["var0"], [0.6, 1.6], **TOL)
  np.testing.assert_allclose(params["var1"], [2.96, 3.96], **TOL)
  np.testing.assert_allclose(average["var0"], [0.75, 1.75], **TOL)
  np.testing.assert_allclose(average["var1"], [2.975, 3.975], **TOL)
  assert state.count.dtype == jnp.int32
  assert int(state.count) == 2


def test_first_step_matches_tfa():
  # Step 1: params [0.8, 1.8] / [2.98, 3.98]; the average, a copy of the
  # initial params, moves halfway: [0.9, 1.9] / [2.99, 3.99].
  tx = optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5)
  history, _ = _run(tx, 1)
  params, average = history[0]
  np.testing.assert_allclose(params["var0"], [0.8, 1.8], **TOL)
  np.testing.assert_allclose(params["var1"], [2.98, 3.98], **TOL)
  np.testing.assert_allclose(average["var0"], [0.9, 1.9], **TOL)
  np.testing.assert_allclose(average["var1"], [2.99, 3.99], **TOL)


def test_start_step_matches_tfa():
  tx = optax_ema.moving_average(optax.sgd(1.0), average_decay=0.5, start_step=1)
  history, _ = _run(tx, 2)
  np.testing.assert_allclose(history[0][1]["var0"], [0.9, 1.9], **TOL)
  np.testing.assert_allclose(history[1][1]["var0"], [0.85, 1.85], **TOL)


def test_dynamic_decay_matches_tfa():
  tx = optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5, dynamic_decay=True)
  history, _ = _run(tx, 2)
  # Step 1 uses decay 0.1: 1 - (1 - 0.8) * 0.9 = 0.82.
  np.testing.assert_allclose(history[0][1]["var0"], [0.82, 1.82], **TOL)
  np.testing.assert_allclose(history[1][1]["var0"], [0.64, 1.64], **TOL)


def test_num_updates_clamps_decay_to_two_elevenths():
  tx = optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5, num_updates=1)
  history, _ = _run(tx, 1)
  decay = np.float32(2.0) / np.float32(11.0)
  one = np.float32(1.0)
  x = np.array([0.8, 1.8], np.float32)
  want = np.array([1.0, 2.0], np.float32)
  want = want - (want - x) * (one - decay)
  np.testing.assert_allclose(history[0][1]["var0"], want, **TOL)


def test_updates_are_those_of_the_wrapped_optimizer():
  params = _params()
  inner = optax.sgd(2.0)
  tx = optax_ema.moving_average(inner, average_decay=0.5)
  updates, _ = tx.update(_grads(), tx.init(params), params)
  want, _ = inner.update(_grads(), inner.init(params), params)
  for name in params:
    np.testing.assert_array_equal(updates[name], want[name])


def test_defaults_are_tfas():
  # TFA: average_decay=0.99, sequential_update=True, no num_updates, no start
  # step, no dynamic decay. One step from 1.0 to 0.8 with decay 0.99.
  tx = optax_ema.moving_average(optax.sgd(2.0))
  history, _ = _run(tx, 1)
  one = np.float32(1.0)
  want = one - (one - np.float32(0.8)) * (one - np.float32(0.99))
  np.testing.assert_allclose(history[0][1]["var0"][0], want, **TOL)
