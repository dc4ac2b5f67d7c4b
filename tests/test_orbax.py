"""Orbax checkpoints of a MovingAverageState.

A run checkpointed with orbax.checkpoint.CheckpointManager and resumed must
be bit-identical to the uninterrupted run; a checkpoint written before EMA
was enabled resumes through optax_ema.resume_with_average.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_ema

X = np.random.default_rng(2).normal(size=(16, 3)).astype(np.float32)
Y = X @ np.array([[1.0], [-1.0], [0.5]], np.float32)


def _params():
  return {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}


def _make_step(tx):
  @jax.jit
  def step(train):
    params, opt_state = train["params"], train["opt_state"]

    def loss(p):
      return jnp.mean((X @ p["w"] + p["b"] - Y) ** 2)

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": train["step"] + 1}

  return step


def _tx():
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax_ema.moving_average(optax.adam(0.05), average_decay=0.8, dynamic_decay=True),
  )


def _manager(path):
  return ocp.CheckpointManager(
    path, options=ocp.CheckpointManagerOptions(max_to_keep=2)
  )


def _assert_trees_identical(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.orbax
def test_checkpoint_restore_and_continue_is_bit_identical(tmp_path):
  tx = _tx()
  step = _make_step(tx)
  train = {"params": _params(), "opt_state": tx.init(_params()), "step": 0}
  for _ in range(3):
    train = step(train)
  with _manager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.StandardSave(train))
    mngr.wait_until_finished()
  uninterrupted = train
  for _ in range(3):
    uninterrupted = step(uninterrupted)

  target = jax.eval_shape(lambda: train)
  with _manager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 3
    restored = mngr.restore(3, args=ocp.args.StandardRestore(target))
  assert isinstance(restored["opt_state"][1], optax_ema.MovingAverageState)
  _assert_trees_identical(restored, train)
  for _ in range(3):
    restored = step(restored)
  _assert_trees_identical(restored, uninterrupted)
  assert int(restored["opt_state"][1].count) == int(restored["step"]) == 6


@pytest.mark.parametrize("what", ["wrapped_state", "whole_old_state"])
@pytest.mark.orbax
def test_pre_ema_checkpoint_resumes_through_resume_with_average(tmp_path, what):
  old_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
  old_step = _make_step(old_tx)
  train = {"params": _params(), "opt_state": old_tx.init(_params()), "step": 0}
  for _ in range(3):
    train = old_step(train)
  with _manager(tmp_path / "old") as mngr:
    mngr.save(3, args=ocp.args.StandardSave(train))
    mngr.wait_until_finished()
  plain = train
  for _ in range(3):
    plain = old_step(plain)

  with _manager(tmp_path / "old") as mngr:
    target = jax.eval_shape(lambda: train)
    restored = mngr.restore(3, args=ocp.args.StandardRestore(target))
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax_ema.moving_average(optax.adam(0.05), average_decay=0.5),
  )
  old_state = restored["opt_state"]
  inner = old_state[1] if what == "wrapped_state" else old_state
  opt_state = optax_ema.resume_with_average(tx, inner, restored["params"])
  assert jax.tree.structure(opt_state) == jax.tree.structure(tx.init(_params()))
  ma = opt_state[1]
  assert int(ma.count) == 0
  _assert_trees_identical(ma.inner_state, old_state[1])  # adam continues
  _assert_trees_identical(ma.average, restored["params"])  # average starts there

  step = _make_step(tx)
  train = {"params": restored["params"], "opt_state": opt_state, "step": 3}
  trajectory = [jax.tree.map(np.asarray, train["params"])]
  for _ in range(3):
    train = step(train)
    trajectory.append(jax.tree.map(np.asarray, train["params"]))
  # Training itself is exactly the run that never enabled EMA.
  _assert_trees_identical(train["params"], plain["params"])
  want = {k: np.asarray(trajectory[0][k], np.float64) for k in ("w", "b")}
  for p in trajectory[1:]:
    want = {k: want[k] - (want[k] - p[k]) * 0.5 for k in want}
  avg = optax_ema.averaged_params(train["opt_state"], train["params"])
  for k in want:
    np.testing.assert_allclose(avg[k], want[k], rtol=1e-6, atol=1e-7)
  assert int(train["step"]) == 6


def test_resume_with_average_rejects_a_state_of_another_optimizer():
  tx = optax_ema.moving_average(optax.adam(0.1))
  wrong = optax.sgd(0.1, momentum=0.9).init(_params())
  with pytest.raises(ValueError, match="`inner_state` has the structure neither"):
    optax_ema.resume_with_average(tx, wrong, _params())
  other_shapes = optax.adam(0.1).init({**_params(), "w": jnp.zeros((2, 1))})
  with pytest.raises(ValueError, match=r"`inner_state` does not fit.*\['w'\]"):
    optax_ema.resume_with_average(tx, other_shapes, _params())
  with pytest.raises(ValueError, match=r"exactly one optax_ema\.moving_average"):
    optax_ema.resume_with_average(optax.adam(0.1), wrong, _params())
