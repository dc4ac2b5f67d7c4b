"""Equinox: the whole module in, the same module out, with averaged arrays.

The state is initialised on ``eqx.filter(model, ...)``, so it holds ``None``
where the module holds activation functions, a ``Dropout``'s float ``p`` and
flag, and (with ``eqx.is_inexact_array``) an integer buffer. References are
NumPy EMAs of the recorded trajectory.
"""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

DECAY = 0.6


class _Net(eqx.Module):
  mlp: eqx.nn.MLP
  drop: eqx.nn.Dropout
  seen: jax.Array  # an integer buffer, moved by hand each step

  def __call__(self, x, key=None):
    return self.mlp(self.drop(x, key=key, inference=key is None))


def _net():
  mlp = eqx.nn.MLP(
    3, 1, 4, 2, activation=jax.nn.relu, final_activation=jnp.tanh, key=jax.random.key(0)
  )
  return _Net(mlp, eqx.nn.Dropout(0.25), jnp.zeros(2, jnp.int32))


def _floats(model):
  return [
    np.asarray(x, np.float64)
    for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
  ]


def _train(is_param, steps=3):
  model = _net()
  # Plain SGD: optax.adam's state casting does not take the None gradient
  # eqx.filter_grad gives an integer buffer that eqx.is_array kept.
  tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=DECAY)
  state = tx.init(eqx.filter(model, is_param))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)

  @eqx.filter_jit(donate="all-except-first")
  def step(key, model, state):
    def loss(m):
      keys = jax.random.split(key, x.shape[0])
      return jnp.mean(jax.vmap(m)(x, keys) ** 2 - jax.vmap(m)(x))

    grads = eqx.filter_grad(loss)(model)
    updates, state = tx.update(grads, state, eqx.filter(model, is_param))
    model = eqx.apply_updates(model, updates)
    return eqx.tree_at(lambda m: m.seen, model, model.seen + 1), state

  trajectory = [_floats(model)]
  for i in range(steps):
    model, state = step(jax.random.key(i), model, state)
    trajectory.append(_floats(model))
  want = trajectory[0]
  for leaves in trajectory[1:]:
    want = [a - (a - p) * (1 - DECAY) for a, p in zip(want, leaves, strict=True)]
  return model, state, trajectory, want


@pytest.mark.parametrize("is_param", [eqx.is_array, eqx.is_inexact_array])
def test_averaged_params_takes_and_returns_the_whole_module(is_param):
  model, state, trajectory, want = _train(is_param)
  assert not np.allclose(trajectory[0][0], trajectory[-1][0])
  averaged = optax_ema.averaged_params(state, model)
  assert type(averaged) is _Net
  for got, w in zip(_floats(averaged), want, strict=True):
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
  # Non-array leaves and the integer buffer come from the module as it is.
  assert averaged.mlp.activation is model.mlp.activation
  assert averaged.mlp.final_activation is model.mlp.final_activation
  assert averaged.drop.p == 0.25 and averaged.drop.inference is False
  np.testing.assert_array_equal(np.asarray(averaged.seen), [3, 3])
  assert averaged.seen.dtype == jnp.int32
  out = averaged(jnp.ones(3))  # the averaged module runs
  assert out.shape == (1,) and np.all(np.isfinite(out))


@pytest.mark.parametrize("is_param", [eqx.is_array, eqx.is_inexact_array])
def test_diagnostics_takes_the_whole_module(is_param):
  model, state, trajectory, want = _train(is_param)
  stats = optax_ema.diagnostics(state, model)
  live = trajectory[-1]
  diff = np.sqrt(sum(np.sum((w - p) ** 2) for w, p in zip(want, live, strict=True)))
  ref = np.sqrt(sum(np.sum(p**2) for p in live))
  np.testing.assert_allclose(float(stats["drift"]), diff / ref, rtol=1e-5)
  assert int(stats["count"]) == 3
  np.testing.assert_allclose(float(stats["decay"]), DECAY, rtol=1e-6)


def test_a_float_array_where_the_state_holds_none_is_an_error():
  model = _net()
  tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=DECAY)
  params = eqx.filter(model, eqx.is_inexact_array)
  params = eqx.tree_at(lambda m: m.mlp.layers[-1].bias, params, replace=None)
  state = tx.init(params)
  with pytest.raises(
    ValueError, match=r"\.bias is None in the state but a floating point array"
  ):
    optax_ema.averaged_params(state, model)
  with pytest.raises(ValueError, match=r"None in the state but a floating point"):
    optax_ema.diagnostics(state, model)


def test_an_update_may_be_none_only_where_the_leaf_is_not_floating_point():
  params = {"w": jnp.ones(2), "n": jnp.zeros(2, jnp.int32)}
  tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=DECAY)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2), "n": None}, state, params)
  with pytest.raises(ValueError, match=r"\['w'\] is None in `updates`"):
    tx.update({"w": None, "n": None}, state, params)


@pytest.mark.subprocess
def test_import_optax_ema_does_not_import_equinox():
  code = "import sys, optax_ema; print('equinox' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"


def test_tree_average_keeps_an_average_of_batch_norm_state():
  bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
    3, "batch", momentum=0.5, mode="ema"
  )
  tracker = optax_ema.tree_average(optax_ema.swa(optax.identity(), 0, 1))
  tracked = tracker.init(state)
  forward = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
  running, history = np.zeros(3), []
  for i in range(3):
    batch = x * (i + 1)
    _, state = forward(jnp.asarray(batch), state)
    running = batch.mean(axis=0) if i == 0 else 0.5 * running + 0.5 * batch.mean(0)
    history.append(running)
    tracked = tracker.update(state, tracked)
  averaged = optax_ema.averaged_params(tracked, state)
  assert type(averaged) is type(state)
  means = [leaf for leaf in jax.tree.leaves(averaged) if leaf.shape == (3,)]
  np.testing.assert_allclose(means[0], np.mean(history, axis=0), rtol=1e-6)
  # The running mean of the live state is the last one, not the average.
  live = [leaf for leaf in jax.tree.leaves(state) if leaf.shape == (3,)]
  np.testing.assert_allclose(live[0], history[-1], rtol=1e-6)
