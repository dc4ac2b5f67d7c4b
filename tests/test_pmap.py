"""Data-parallel training with jax.pmap on 8 fake CPU devices.

Gradients are averaged with ``lax.pmean``; every device then holds the same
average, equal to a single-device run on the whole batch and to a NumPy
reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ema

N_DEV = 8
DECAY = 0.75
LR = 0.1


def _data():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(N_DEV * 4, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5, 2))).astype(np.float32)
  return x, y


def _params():
  return {"w": jnp.zeros((5, 2)), "b": jnp.zeros(2)}


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _tx():
  return optax_ema.moving_average(optax.sgd(LR, momentum=0.9), average_decay=DECAY)


def _train_pmap(steps):
  assert jax.device_count() == N_DEV
  tx = _tx()
  x, y = _data()
  xs = x.reshape(N_DEV, -1, x.shape[-1])
  ys = y.reshape(N_DEV, -1, y.shape[-1])

  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(_loss)(params, x, y), axis_name="batch")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p_step = jax.pmap(step, axis_name="batch")
  params = _params()
  replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)
  params, state = replicate(params), replicate(tx.init(params))
  for _ in range(steps):
    params, state = p_step(params, state, xs, ys)
  return params, state


def _train_single(steps):
  tx = _tx()
  x, y = _data()
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _numpy_reference(steps):
  x, y = (a.astype(np.float64) for a in _data())
  w, b = np.zeros((5, 2)), np.zeros(2)
  mw, mb = np.zeros_like(w), np.zeros_like(b)
  aw, ab = w.copy(), b.copy()
  for _ in range(steps):
    r = 2 * (x @ w + b - y) / y.size
    gw, gb = x.T @ r, r.sum(axis=0)
    mw, mb = 0.9 * mw + gw, 0.9 * mb + gb
    w, b = w - LR * mw, b - LR * mb
    aw, ab = aw - (aw - w) * (1 - DECAY), ab - (ab - b) * (1 - DECAY)
  return {"w": aw, "b": ab}


def test_pmap_averages_are_identical_on_all_devices_and_match_single_device():
  steps = 4
  params, state = _train_pmap(steps)
  assert state.average["w"].shape == (N_DEV, 5, 2)
  assert len(state.average["w"].sharding.device_set) == N_DEV
  for leaf in jax.tree.leaves((params, state)):
    host = np.asarray(leaf)
    for d in range(1, N_DEV):
      np.testing.assert_array_equal(host[d], host[0])
  np.testing.assert_array_equal(np.asarray(state.count), np.full(N_DEV, steps))

  _, single = _train_single(steps)
  want = _numpy_reference(steps)
  device0 = jax.tree.map(lambda a: np.asarray(a)[0], state)
  for k in want:
    np.testing.assert_allclose(
      device0.average[k], single.average[k], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(device0.average[k], want[k], rtol=1e-5, atol=1e-6)
  assert not np.allclose(want["w"], 0.0)
