"""The checks optax runs on every wrapper, applied to ``moving_average``.

Expected values come from TFA's upstream setup worked by hand: var0 = [1, 2],
gradient 0.1, SGD(2.0), decay 0.5 gives params 0.8, 0.6 and averages 0.9,
0.75 after one and two steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

TOL = {"rtol": 1e-6, "atol": 1e-7}


def _params():
  # Explicit dtypes: a weakly typed scalar would turn strong after a step
  # and retrace on its own.
  return {"w": jnp.array([1.0, 2.0], jnp.float32), "b": jnp.array(3.0, jnp.float32)}


def _grads():
  return {"w": jnp.full(2, 0.1, jnp.float32), "b": jnp.array(0.1, jnp.float32)}


def _recording_inner(log):
  """An identity transformation that records the extra args it receives."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    log.append(extra_args)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_extra_args_are_forwarded_to_the_inner_transformation():
  log = []
  tx = optax_ema.moving_average(_recording_inner(log), 0.5)
  params = _params()
  state = tx.init(params)
  tx.update(_grads(), state, params, loss=jnp.asarray(1.5), epoch=3)
  assert len(log) == 1
  assert set(log[0]) == {"loss", "epoch"}
  assert float(log[0]["loss"]) == 1.5
  assert log[0]["epoch"] == 3


def test_extra_args_are_forwarded_under_jit():
  log = []
  tx = optax_ema.moving_average(_recording_inner(log), 0.5)
  params = _params()
  step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
  step(_grads(), tx.init(params), params, jnp.asarray(2.0))
  assert [set(extra) for extra in log] == [{"value"}]


def test_unknown_extra_args_are_accepted_by_a_plain_inner_transformation():
  # optax.sgd takes no extra args: with_extra_args_support drops them.
  tx = optax_ema.moving_average(optax.sgd(2.0), 0.5)
  params = _params()
  updates, state = tx.update(
    _grads(), tx.init(params), params, some_unknown_arg=1, value=jnp.zeros(())
  )
  np.testing.assert_allclose(updates["w"], [-0.2, -0.2], **TOL)
  np.testing.assert_allclose(state.average["w"], [0.9, 1.9], **TOL)


def test_extra_args_reach_a_transformation_that_uses_them():
  # optax.contrib.reduce_on_plateau reads `value`: wrapped, it must scale
  # exactly as it does alone on the same losses.
  def inner():
    return optax.chain(
      optax.sgd(2.0),
      optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0),
    )

  tx, alone = optax_ema.moving_average(inner(), 0.5), inner()
  params = _params()
  state, alone_state = tx.init(params), alone.init(params)
  for loss in (3.0, 2.0, 2.0, 2.0, 2.0, 1.0):
    value = jnp.asarray(loss)
    updates, state = tx.update(_grads(), state, params, value=value)
    want, alone_state = alone.update(_grads(), alone_state, params, value=value)
    assert float(state.inner_state[1].scale) == float(alone_state[1].scale)
    np.testing.assert_array_equal(updates["w"], want["w"])
  assert float(alone_state[1].scale) < 1.0  # the plateau was detected


def test_second_jitted_step_does_not_retrace():
  tx = optax_ema.moving_average(
    optax.adam(1e-2), 0.9, num_updates=10, dynamic_decay=True, start_step=1
  )
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(_grads(), state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert len(traces) == 1


def test_second_jitted_step_does_not_retrace_with_low_precision_and_ints():
  params = {
    "w": jnp.ones(3, jnp.bfloat16),
    "h": jnp.ones(2, jnp.float16),
    "n": jnp.zeros((), jnp.int32),
  }
  tx = optax_ema.moving_average(optax.identity(), 0.9)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates = {
      "w": jnp.full(3, 0.5, jnp.bfloat16),
      "h": jnp.full(2, 0.5, jnp.float16),
      "n": jnp.ones((), jnp.int32),
    }
    _, state = tx.update(updates, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


def test_runs_inside_lax_scan():
  tx = optax_ema.moving_average(optax.sgd(2.0), 0.5)

  def body(carry, _):
    params, state = carry
    updates, state = tx.update(_grads(), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), optax_ema.averaged_params(state)["w"]

  params = _params()
  (params, state), history = jax.jit(
    lambda p: jax.lax.scan(body, (p, tx.init(p)), length=2)
  )(params)
  np.testing.assert_allclose(history, [[0.9, 1.9], [0.75, 1.75]], **TOL)
  np.testing.assert_allclose(params["w"], [0.6, 1.6], **TOL)
  assert int(state.count) == 2


def test_jit_with_donated_params_and_state():
  tx = optax_ema.moving_average(optax.sgd(2.0), 0.5)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  params = _params()
  state = tx.init(params)  # eager init: the average must not alias params
  first_w, first_avg = params["w"], state.average["w"]
  for _ in range(2):
    params, state = step(params, state, _grads())
  assert first_w.is_deleted()
  assert first_avg.is_deleted()
  np.testing.assert_allclose(params["w"], [0.6, 1.6], **TOL)
  np.testing.assert_allclose(state.average["w"], [0.75, 1.75], **TOL)


def test_init_copies_the_params():
  params = _params()
  state = optax_ema.moving_average(optax.sgd(1.0)).init(params)
  assert state.average["w"] is not params["w"]
  assert (
    state.average["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
  )


def test_tree_map_params_works_on_the_state():
  tx = optax_ema.moving_average(optax.sgd(2.0, momentum=0.9), 0.5)
  params = _params()
  _, state = tx.update(_grads(), tx.init(params), params)
  labels = {"w": "W", "b": "B"}
  mapped = optax.tree_map_params(
    tx,
    lambda _, label: label,
    state,
    labels,
    transform_non_params=lambda _: "other",
  )
  assert mapped.average == labels
  assert mapped.inner_state[0].trace == labels  # the momentum buffer
  assert mapped.count == "other"


def test_tree_map_params_maps_the_average_values():
  tx = optax_ema.moving_average(optax.sgd(2.0), 0.5)
  params = _params()
  _, state = tx.update(_grads(), tx.init(params), params)
  doubled = optax.tree_map_params(tx, lambda p: 2 * p, state)
  np.testing.assert_allclose(doubled.average["w"], [1.8, 3.8], **TOL)
  assert int(doubled.count) == 1


def test_state_dtypes_stable_across_steps():
  labels = {"f32": "adam", "bf16": "adam", "i32": "frozen"}
  inner = optax.multi_transform(
    {"adam": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels
  )
  tx = optax_ema.moving_average(inner, lambda t: 0.9 + 0.0 * t)
  params = {
    "f32": jnp.ones(2),
    "bf16": jnp.ones(2, jnp.bfloat16),
    "i32": jnp.zeros(2, jnp.int32),
  }
  state = tx.init(params)
  avals = jax.tree.map(jax.typeof, state)

  @jax.jit
  def step(params, state):
    grads = {
      "f32": jnp.ones(2),
      "bf16": jnp.ones(2, jnp.bfloat16),
      "i32": jnp.ones(2, jnp.int32),
    }
    _, state = tx.update(grads, state, params)
    return state

  for _ in range(3):
    state = step(params, state)
    assert jax.tree.map(jax.typeof, state) == avals


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_sequential_update_false_averages_the_pre_update_params(jit):
  tx = optax_ema.moving_average(optax.sgd(2.0), 0.5, sequential_update=False)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  averages = []
  for _ in range(2):
    updates, state = update(_grads(), state, params)
    params = optax.apply_updates(params, updates)
    averages.append(state.average["w"])
  # Step 1 sees x = 1 (the init value): the average stays 1. Step 2 sees
  # x = 0.8: 1 - (1 - 0.8) * 0.5 = 0.9.
  np.testing.assert_allclose(averages[0], [1.0, 2.0], **TOL)
  np.testing.assert_allclose(averages[1], [0.9, 1.9], **TOL)
  np.testing.assert_allclose(params["w"], [0.6, 1.6], **TOL)


def test_updates_are_returned_unchanged():
  inner = optax.adam(0.1)
  tx = optax_ema.moving_average(inner, 0.9)
  params = _params()
  state, inner_state = tx.init(params), inner.init(params)
  for _ in range(3):
    updates, state = tx.update(_grads(), state, params)
    want, inner_state = inner.update(_grads(), inner_state, params)
    for k in params:
      np.testing.assert_array_equal(updates[k], want[k])
    params = optax.apply_updates(params, updates)


def test_inside_apply_if_finite_a_nan_step_leaves_the_average():
  tx = optax.apply_if_finite(optax_ema.moving_average(optax.sgd(2.0), 0.5), 3)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  nan_grads = {"w": jnp.array([jnp.nan, 0.1]), "b": jnp.array(0.1)}
  for grads in (_grads(), nan_grads, _grads()):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], [0.6, 1.6], **TOL)
  np.testing.assert_allclose(optax_ema.averaged_params(state)["w"], [0.75, 1.75], **TOL)


def test_count_saturates_instead_of_overflowing():
  tx = optax_ema.moving_average(optax.sgd(2.0), 0.5)
  params = _params()
  top = jnp.iinfo(jnp.int32).max
  state = tx.init(params)._replace(count=jnp.asarray(top, jnp.int32))
  _, state = jax.jit(tx.update)(_grads(), state, params)
  assert state.count.dtype == jnp.int32
  assert int(state.count) == top
  # The step still averages: 1 - (1 - 0.8) * 0.5.
  np.testing.assert_allclose(state.average["w"], [0.9, 1.9], **TOL)


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("params", [{}, {"w": None}], ids=["empty", "none-leaf"])
def test_a_tree_without_arrays_still_counts_and_debiases(params, debias):
  # Nothing to average, but the state moves on as for any tree: optax's
  # wrappers accept empty params (a model with no trainable leaves).
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, debias=debias)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    _, state = step(params, state, params)
  assert int(state.count) == 3
  assert optax_ema.averaged_params(state) == params
  if debias:
    np.testing.assert_allclose(state.average.weight, 1 - 0.9**3, rtol=1e-6)


def test_per_leaf_decays_with_every_leaf_masked_out():
  params = {"w": jnp.ones(2), "b": jnp.zeros(3)}
  decay = optax_ema.schedules.per_leaf({"w": 0.9, "b": 0.5})
  tx = optax_ema.moving_average(
    optax.sgd(0.1), decay, debias=True, mask={"w": False, "b": False}
  )
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  assert int(state.count) == 1
  assert state.step_size.shape == (0,)  # one per averaged leaf: none
