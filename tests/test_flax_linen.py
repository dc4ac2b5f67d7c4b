"""Flax linen TrainState with moving_average.

References are NumPy EMAs of the recorded parameter trajectory; batch
statistics follow flax's documented BatchNorm rule
``ra <- momentum * ra + (1 - momentum) * batch_stat``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import optax_ema

import helpers


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(1)(nn.relu(x))


class _BNTrainState(train_state.TrainState):
  batch_stats: Any


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32))[:, None]
  return jnp.asarray(x), jnp.asarray(y)


def _linear_state(tx):
  return train_state.TrainState.create(
    apply_fn=lambda variables, x: (
      x @ variables["params"]["w"] + variables["params"]["b"]
    ),
    params={"w": jnp.array([[0.5], [-0.5], [1.0]]), "b": jnp.zeros(1)},
    tx=tx,
  )


def _linear_grads(state, x, y):
  loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
  return jax.grad(loss)(state.params)


def test_apply_gradients_trains_exactly_like_the_wrapped_optimizer():
  x, y = _data()
  ema = _linear_state(optax_ema.moving_average(optax.adam(0.05), average_decay=0.8))
  plain = _linear_state(optax.adam(0.05))
  trajectory = [jax.tree.map(np.asarray, ema.params)]
  step = jax.jit(lambda s: s.apply_gradients(grads=_linear_grads(s, x, y)))
  for _ in range(4):
    ema, plain = step(ema), step(plain)
    trajectory.append(jax.tree.map(np.asarray, ema.params))
  for a, b in zip(
    jax.tree.leaves(ema.params), jax.tree.leaves(plain.params), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  want = helpers.np_ema(trajectory[0], trajectory[1:], [0.8] * 4)
  got = optax_ema.averaged_params(ema)  # found inside the TrainState itself
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_averaged_train_state_swaps_only_the_params():
  x, y = _data()
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax_ema.moving_average(optax.sgd(0.1), average_decay=0.5),
  )
  state = _linear_state(tx)
  for _ in range(3):
    state = state.apply_gradients(grads=_linear_grads(state, x, y))
  live = jax.tree.map(np.asarray, state.params)
  averaged = optax_ema.averaged_train_state(state)
  for k, v in optax_ema.averaged_params(state).items():
    np.testing.assert_array_equal(averaged.params[k], v)
    assert not np.array_equal(averaged.params[k], live[k])
    np.testing.assert_array_equal(state.params[k], live[k])  # original kept
  assert averaged.step == state.step == 3
  assert averaged.opt_state is state.opt_state
  assert averaged.apply_fn is state.apply_fn
  out = averaged.apply_fn({"params": averaged.params}, x)
  assert out.shape == (16, 1)


def test_averaged_train_state_keeps_bfloat16_param_dtypes():
  state = train_state.TrainState.create(
    apply_fn=None,
    params={"w": jnp.ones(3, jnp.bfloat16)},
    tx=optax_ema.moving_average(optax.sgd(0.5), average_decay=0.5),
  )
  state = state.apply_gradients(grads={"w": jnp.ones(3, jnp.bfloat16)})
  averaged = optax_ema.averaged_train_state(state)
  assert averaged.params["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(averaged.params["w"], np.float32), 0.75)


def _bn_setup():
  model = _MLP()
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=False)
  state = _BNTrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optax_ema.moving_average(optax.adam(0.02), average_decay=0.7),
  )

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      out, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return jnp.mean((out - y) ** 2), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates["batch_stats"])

  return model, x, state, train_step


def test_batchnorm_model_trains_and_evaluates_with_averaged_params():
  _model, x, state, train_step = _bn_setup()
  for _ in range(3):
    state = train_step(state)
  averaged = optax_ema.averaged_train_state(state)
  # Batch statistics are not parameters: the copy keeps the live ones.
  for a, b in zip(
    jax.tree.leaves(averaged.batch_stats),
    jax.tree.leaves(state.batch_stats),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  out = averaged.apply_fn(
    {"params": averaged.params, "batch_stats": averaged.batch_stats}, x, train=False
  )
  # Evaluate by hand in NumPy: Dense -> BatchNorm(running stats) -> relu -> Dense.
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), averaged.params)
  bs = jax.tree.map(lambda v: np.asarray(v, np.float64), averaged.batch_stats)
  h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  bn = bs["BatchNorm_0"]
  h = (h - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * p["BatchNorm_0"]["scale"]
  h = np.maximum(h + p["BatchNorm_0"]["bias"], 0.0)
  want = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_batch_stats_can_be_recomputed_or_averaged_for_the_averaged_params():
  model, x, state, train_step = _bn_setup()
  ema_stats = state.batch_stats
  recorded = [np.asarray(state.batch_stats["BatchNorm_0"]["mean"], np.float64)]
  for _ in range(3):
    state = train_step(state)
    recorded.append(np.asarray(state.batch_stats["BatchNorm_0"]["mean"], np.float64))
    # Averaging the statistics too: one average_op per step.
    ema_stats = optax_ema.average_op(state.batch_stats, ema_stats, 0.7)
  averaged = optax_ema.averaged_train_state(state)
  # Recompute: a training-mode pass of the averaged params; with momentum 0.9
  # the new running mean is 0.9 * old + 0.1 * batch mean of the first layer.
  _, updates = model.apply(
    {"params": averaged.params, "batch_stats": averaged.batch_stats},
    x,
    train=True,
    mutable=["batch_stats"],
  )
  p = averaged.params["Dense_0"]
  h = np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(
    p["bias"], np.float64
  )
  old = np.asarray(averaged.batch_stats["BatchNorm_0"]["mean"], np.float64)
  np.testing.assert_allclose(
    updates["batch_stats"]["BatchNorm_0"]["mean"],
    0.9 * old + 0.1 * h.mean(axis=0),
    rtol=1e-5,
    atol=1e-6,
  )
  recomputed = averaged.replace(batch_stats=updates["batch_stats"])
  assert recomputed.batch_stats is not state.batch_stats
  # The averaged statistics follow the NumPy EMA of the recorded statistics.
  want = recorded[0]
  for r in recorded[1:]:
    want = want - (want - r) * (1 - 0.7)
  np.testing.assert_allclose(
    ema_stats["BatchNorm_0"]["mean"], want, rtol=1e-6, atol=1e-7
  )
  assert not np.allclose(want, recorded[-1])


def test_averaged_train_state_errors_name_the_problem():
  with pytest.raises(TypeError, match="`state` must be a Flax TrainState"):
    optax_ema.averaged_train_state({"params": {}})
  plain = _linear_state(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"averaged_train_state.*no averaging state"):
    optax_ema.averaged_train_state(plain)
