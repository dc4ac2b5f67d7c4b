"""A decay known only in the step and outside [0, 1] (or NaN) does not move the average.

Constants are range-checked when the transform is built; a decay traced by
``optax.inject_hyperparams`` or ``jit``, or a schedule's value at a count the
construction check did not sample, is checked in the step: such a step does
not average, still counts (the optimizer applied its update), and records a
NaN step size, so that ``diagnostics`` shows a NaN decay. Expected values:
NumPy EMAs over the steps whose decay is valid.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers

LR = 0.5
DECAYS = [0.9, 1.5, float("nan"), -0.5, 0.8, 1.0 + 1e-6, 0.7]


def _valid(d):
  return 0.0 <= d <= 1.0  # False for NaN


def _injected(static_args=(), **kwargs):
  return optax.inject_hyperparams(optax_ema.moving_average, static_args=static_args)(
    optimizer=optax.sgd(LR), average_decay=0.9, **kwargs
  )


def _run_injected(decays, **kwargs):
  tx = _injected(**kwargs)
  grads = helpers.grads(len(decays), seed=3)
  params = helpers.params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  sizes, decays_seen = [], []
  for d, g in zip(decays, grads, strict=True):
    state.hyperparams["average_decay"] = jnp.asarray(d, jnp.float32)
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    sizes.append(float(state.inner_state.step_size))
    decays_seen.append(float(optax_ema.diagnostics(state, params)["decay"]))
  return state, grads, sizes, decays_seen


def test_injected_out_of_range_decays_skip_their_steps_and_count_them():
  state, grads, sizes, _ = _run_injected(DECAYS)
  steps = helpers.np_sgd(helpers.params(), grads, LR)
  kept = [(x, d) for x, d in zip(steps, DECAYS, strict=True) if _valid(d)]
  want = helpers.np_ema(helpers.params(), [x for x, _ in kept], [d for _, d in kept])
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert int(state.inner_state.count) == len(DECAYS)
  for d, w in zip(DECAYS, sizes, strict=True):
    if _valid(d):
      assert w == pytest.approx(1.0 - float(np.float32(d)), rel=1e-5)
    else:
      assert math.isnan(w), (d, w)


def test_diagnostics_show_nan_for_a_step_with_an_invalid_decay():
  _, _, _, seen = _run_injected(DECAYS)
  for d, got in zip(DECAYS, seen, strict=True):
    if _valid(d):
      assert got == pytest.approx(float(np.float32(d)), rel=1e-5)
    else:
      assert math.isnan(got), (d, got)


def test_debias_weight_stays_on_a_skipped_step():
  decays = [0.5, 2.0, 0.5]
  state, grads, _, _ = _run_injected(decays, debias=True)
  steps = helpers.np_sgd(helpers.params(), grads, LR)
  # Two valid steps of 0.5 from zero: (0.25 x1 + 0.5 x3) / (1 - 0.25).
  want = jax.tree.map(lambda a, b: (0.25 * a + 0.5 * b) / 0.75, steps[0], steps[2])
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert float(state.inner_state.average.weight) == pytest.approx(0.75)


def test_overwrite_waits_for_a_valid_decay():
  # overwrite_every=1: a step with an invalid decay neither averages nor
  # moves the params onto the (stale) average; the optimizer's step stands.
  tx = _injected(overwrite_every=1, static_args=("overwrite_every",))
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  state.hyperparams["average_decay"] = jnp.asarray(1.5, jnp.float32)
  updates, state = jax.jit(tx.update)({"w": jnp.array([1.0, 1.0])}, state, params)
  np.testing.assert_allclose(np.asarray(updates["w"]), [-LR, -LR])
  np.testing.assert_allclose(np.asarray(state.inner_state.average["w"]), [1.0, 2.0])


def test_several_averages_skip_together_and_mark_only_the_invalid_one():
  params = {"w": jnp.array([1.0, 2.0])}

  @jax.jit
  def step(fast, slow):
    tx = optax_ema.moving_average(optax.sgd(LR), (fast, slow))
    return tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)[1]

  state = step(jnp.float32(0.5), jnp.float32(float("nan")))
  for average in state.average.averages:
    np.testing.assert_array_equal(np.asarray(average["w"]), [1.0, 2.0])
  first, second = (float(w) for w in state.step_size)
  assert first == pytest.approx(1.0) and math.isnan(second)  # 1: never moved


def test_a_transform_built_inside_jit_from_a_traced_decay():
  params = {"w": jnp.array([1.0, 2.0])}

  @jax.jit
  def step(decay):
    tx = optax_ema.moving_average(optax.sgd(LR), decay)
    return tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)[1]

  bad, good = step(jnp.float32(1.7)), step(jnp.float32(0.75))
  np.testing.assert_array_equal(np.asarray(bad.average["w"]), [1.0, 2.0])
  assert int(bad.count) == 1 and math.isnan(float(bad.step_size))
  want = np.array([1.0, 2.0]) - 0.25 * LR  # 0.75 a + 0.25 (a - LR)
  np.testing.assert_allclose(np.asarray(good.average["w"]), want, rtol=1e-6)


def test_a_schedule_that_leaves_the_range_between_sampled_counts():
  # 45 is not among the counts sampled at construction (every count to 32,
  # then four per decade): the step there does not average.
  def schedule(count):
    return jnp.where(count == 45, 1.5, 0.5)

  tx = optax_ema.moving_average(optax.sgd(LR), schedule)
  grads = helpers.grads(47, seed=5)
  _, state, history = helpers.run_recording(
    tx, helpers.params(), grads, lambda p, s, u: float(s.step_size)
  )
  steps = helpers.np_sgd(helpers.params(), grads, LR)
  kept = [x for t, x in enumerate(steps) if t != 45]
  want = helpers.np_ema(helpers.params(), kept, [0.5] * len(kept))
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, 1e-5, 1e-5)
  assert math.isnan(history[45]) and history[46] == pytest.approx(0.5)
  assert int(state.count) == 47


def test_update_every_checks_every_decay_of_its_interval():
  # update_every=2 averages by the product of the two decays since the
  # last move; one of them out of range skips the move.
  def schedule(count):
    return jnp.where(count == 41, -0.25, 0.5)

  tx = optax_ema.moving_average(optax.sgd(LR), schedule, update_every=2)
  grads = helpers.grads(44, seed=6)
  _, state, history = helpers.run_recording(
    tx, helpers.params(), grads, lambda p, s, u: float(s.step_size)
  )
  steps = helpers.np_sgd(helpers.params(), grads, LR)
  moves = [t for t in range(1, 44, 2) if t != 41]  # (t + 1) % 2 == 0
  want = helpers.np_ema(
    helpers.params(), [steps[t] for t in moves], [0.25] * len(moves)
  )
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert math.isnan(history[41]) and not math.isnan(history[43])


def test_constant_decays_add_no_check_to_the_step():
  # Checked at construction: the compiled step has no range test.
  tx = optax_ema.moving_average(optax.sgd(LR), 0.9)
  params = helpers.params()
  text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
  assert "conditional" not in text and "case" not in text


def test_a_schedule_closing_over_a_traced_value_is_checked_in_the_step():
  # Built inside jit, the schedule cannot be sampled at construction.
  params = {"w": jnp.array([1.0, 2.0])}

  @jax.jit
  def step(peak):
    tx = optax_ema.moving_average(optax.sgd(LR), lambda count: peak + 0.0 * count)
    return tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)[1]

  bad, good = step(jnp.float32(1.25)), step(jnp.float32(0.5))
  np.testing.assert_array_equal(np.asarray(bad.average["w"]), [1.0, 2.0])
  assert math.isnan(float(bad.step_size))
  want = np.array([1.0, 2.0]) - 0.5 * LR
  np.testing.assert_allclose(np.asarray(good.average["w"]), want, rtol=1e-6)


def test_debias_under_inject_hyperparams_with_a_traced_start_step():
  # inject_hyperparams traces start_step too: the construction check of
  # debias with a decay of 1 must not need its value.
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(LR), average_decay=0.5, debias=True, start_step=1
  )
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for g in ([1.0, 2.0], [3.0, -1.0]):
    updates, state = update({"w": jnp.array(g)}, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(np.asarray(params["w"]))
  # Step 0 copies the params (before start_step), step 1 averages at 0.5;
  # the debias weight is 1 from the copy on.
  want = 0.5 * seen[0] + 0.5 * seen[1]
  np.testing.assert_allclose(
    np.asarray(optax_ema.averaged_params(state)["w"]), want, rtol=1e-6
  )


def _temp_bytes(tx, params):
  state = jax.eval_shape(tx.init, params)
  update = jax.jit(tx.update, donate_argnums=(1,))
  compiled = update.lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("case", ["schedule", "inject_hyperparams"])
def test_a_decay_checked_in_the_step_adds_no_model_sized_buffer(case):
  # One large leaf: the check is a select inside the averaging pass, not a
  # gate that takes the new params as an operand (a buffer of their size).
  params = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
  param_bytes = 2048 * 2048 * 4
  base = _temp_bytes(optax_ema.moving_average(optax.sgd(LR), 0.999), params)
  if case == "schedule":
    tx = optax_ema.moving_average(optax.sgd(LR), optax_ema.schedules.warmup(0.999))
  else:
    tx = _injected()
  assert _temp_bytes(tx, params) - base < 0.05 * param_bytes


def test_debias_with_a_schedule_that_is_1_only_at_first_averages_from_then_on():
  # Refused only when the schedule is 1 at every count: here the first step
  # keeps the (zero) average, the next two average at 0.5.
  tx = optax_ema.moving_average(
    optax.sgd(LR), lambda count: jnp.where(count == 0, 1.0, 0.5), debias=True
  )
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  seen = []
  for g in ([1.0, 2.0], [3.0, -1.0], [0.5, 0.5]):
    updates, state = tx.update({"w": jnp.array(g)}, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(np.asarray(params["w"]))
  # Debiased: (0.25 x2 + 0.5 x3) / (1 - 0.25).
  want = (0.25 * seen[1] + 0.5 * seen[2]) / 0.75
  np.testing.assert_allclose(
    np.asarray(optax_ema.averaged_params(state)["w"]), want, rtol=1e-6
  )
