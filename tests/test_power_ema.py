"""power_ema: the closed-form power-function weights and the wrapper conventions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers


def _gamma(sigma_rel):
  # Largest real root of the EDM2 cubic, by NumPy (independent of the package).
  t = sigma_rel**-2
  return max(
    r.real for r in np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]) if abs(r.imag) < 1e-9
  )


def _closed_form(xs, gamma):
  """EDM2 power EMA after len(xs) updates: sum_i w_i x_i, float64."""
  t = len(xs)
  i = np.arange(1, t + 1, dtype=np.float64)
  w = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)
  return np.tensordot(w, np.asarray(xs, np.float64), axes=1)


def test_update_equals_closed_form_power_weights():
  rng = np.random.default_rng(0)
  grads = [{"w": jnp.asarray(rng.normal(size=3), jnp.float32)} for _ in range(40)]
  tx = optax_ema.power_ema(optax.sgd(0.5), sigma_rels=(0.05, 0.10, 0.2))
  params, state, history = helpers.run_recording(
    tx, {"w": jnp.zeros(3, jnp.float32)}, grads
  )
  xs = [np.asarray(h["w"]) for h in history]
  for sigma_rel in (0.05, 0.10, 0.2):
    got = optax_ema.averaged_params(state, params, which=sigma_rel)["w"]
    np.testing.assert_allclose(got, _closed_form(xs, _gamma(sigma_rel)), rtol=1e-5)


def test_every_intermediate_average_equals_closed_form():
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.10,))
  params = jnp.zeros(())
  state = tx.init(params)
  xs = []
  for t in range(1, 12):
    updates, state = tx.update(-jnp.float32(np.sin(t)), state, params)
    params = optax.apply_updates(params, updates)
    xs.append(float(params))
    want = _closed_form(xs, _gamma(0.10))
    np.testing.assert_allclose(float(state.averages["0.1"]), want, rtol=1e-5)
    assert int(state.count) == t


def test_long_run_step_keeps_float32_precision():
  # After 10**6 updates the weight of the new value is ~8e-6; a 1 - decay in
  # float32 would get it wrong by ~1%. Start from a state at that count.
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.10,))
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  state = state._replace(count=jnp.int32(10**6))
  _, state = tx.update({"w": -jnp.ones(4)}, state, params)
  t = 10**6 + 1
  weight = -np.expm1((_gamma(0.10) + 1) * np.log1p(-1 / t))
  np.testing.assert_allclose(state.averages["0.1"]["w"], weight, rtol=1e-5)


def test_updates_are_returned_unchanged():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.3, 0.1])}
  inner = optax.adam(0.1)
  want, _ = inner.update(grads, inner.init(params), params)
  tx = optax_ema.power_ema(inner)
  got, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(got, want)


def test_state_holds_sorted_profiles_and_count():
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.10, 0.05))
  state = tx.init({"w": jnp.ones(2)})
  assert isinstance(state, optax_ema.PowerEmaState)
  assert list(state.averages) == ["0.05", "0.1"]
  assert state.count.dtype == jnp.int32 and int(state.count) == 0


def test_which_by_value_index_and_key():
  grads = [{"w": jnp.full(2, float(i))} for i in range(5)]
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.10))
  params, state, _ = helpers.run_recording(tx, {"w": jnp.zeros(2)}, grads)
  by_value = optax_ema.averaged_params(state, params, which=0.10)
  chex.assert_trees_all_equal(by_value, optax_ema.averaged_params(state, which=1))
  chex.assert_trees_all_equal(by_value, optax_ema.averaged_params(state, which="0.1"))
  chex.assert_trees_all_equal(
    state.averages["0.05"], optax_ema.averaged_params(state, which=0)
  )


def test_which_none_with_several_profiles_lists_them():
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.10))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"tracks 2 profiles \(sigma_rel 0.05, 0.1\)"):
    optax_ema.averaged_params(state)


def test_which_none_with_one_profile_returns_it():
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.07,))
  state = tx.init({"w": jnp.ones(2)})
  chex.assert_trees_all_equal(optax_ema.averaged_params(state), {"w": jnp.ones(2)})


@pytest.mark.parametrize("which", [0.07, 2, -3, "0.2"])
def test_which_not_tracked_is_an_error(which):
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.10))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"0\.05, 0\.1"):
    optax_ema.averaged_params(state, which=which)


def test_found_inside_chain():
  tx = optax.chain(optax.clip(1.0), optax_ema.power_ema(optax.sgd(1.0)))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
  params = optax.apply_updates(params, updates)
  got = optax_ema.averaged_params(state, params, which=0.05)
  np.testing.assert_allclose(got["w"], [1.0, 1.0])  # first update copies


def test_low_precision_params_accumulate_in_float32():
  params = {"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
  tx = optax_ema.power_ema(optax.sgd(0.1))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  for avg in state.averages.values():
    assert avg["w"].dtype == jnp.float32 and avg["b"].dtype == jnp.float32
  out = optax_ema.averaged_params(state, params, which=0)
  assert out["w"].dtype == jnp.bfloat16


def test_ema_dtype_is_used():
  tx = optax_ema.power_ema(optax.sgd(0.1), ema_dtype=jnp.bfloat16)
  state = tx.init({"w": jnp.ones(3)})
  assert all(a["w"].dtype == jnp.bfloat16 for a in state.averages.values())


def test_mask_none_and_int_leaves():
  params = {"w": jnp.zeros(2), "frozen": jnp.ones(2), "n": jnp.int32(0), "x": None}
  tx = optax_ema.power_ema(
    optax.sgd(1.0), mask={"w": True, "frozen": False, "n": True, "x": True}
  )
  state = tx.init(params)
  grads = {"w": -jnp.ones(2), "frozen": jnp.zeros(2), "n": jnp.int32(0), "x": None}
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  avg = state.averages["0.05"]
  assert isinstance(avg["frozen"], optax.MaskedNode)
  assert avg["x"] is None
  out = optax_ema.averaged_params(state, params, which=0.05)
  np.testing.assert_allclose(out["frozen"], params["frozen"])
  np.testing.assert_allclose(
    out["w"], _closed_form([1.0, 2.0], _gamma(0.05)), rtol=1e-6
  )


def test_second_jitted_step_does_not_retrace():
  tx = optax_ema.power_ema(optax.sgd(0.1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(params, state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)


def test_runs_under_scan_and_matches_closed_form():
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  params = jnp.zeros(2)

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), p

  grads = -jnp.ones((20, 2))
  (params, state), xs = jax.lax.scan(body, (params, tx.init(params)), grads)
  want = _closed_form(np.asarray(xs), _gamma(0.10))
  np.testing.assert_allclose(state.averages["0.1"], want, rtol=1e-5)


def test_tree_map_params_reaches_every_average():
  tx = optax_ema.power_ema(optax.adam(0.1), sigma_rels=(0.05, 0.10))
  params = {"w": jnp.ones((2, 3))}
  state = tx.init(params)
  mapped = optax.tree_map_params(tx, lambda p: p.shape, state)
  assert mapped.averages["0.05"]["w"] == (2, 3)
  assert mapped.averages["0.1"]["w"] == (2, 3)


def test_donated_params_and_state():
  tx = optax_ema.power_ema(optax.sgd(0.1))

  def step(params, state):
    updates, state = tx.update(params, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  params, state = step(params, state)
  params, state = step(params, state)
  assert int(state.count) == 2


def test_extra_args_are_forwarded_and_unknown_ones_ignored():
  tx = optax_ema.power_ema(optax.sgd(0.1))
  params = {"w": jnp.ones(2)}
  updates, _ = tx.update(params, tx.init(params), params, unknown_arg=3)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1])


@pytest.mark.parametrize(
  "sigma_rels,error,match",
  [
    ((), ValueError, "at least one"),
    ((0.05, 0.4), ValueError, r"`sigma_rels` values must be in \(0, 0.300283\]"),
    ((0.0,), ValueError, "`sigma_rels` values must be in"),
    ((0.05, 0.05), ValueError, "must not repeat"),
    ("0.05", TypeError, "`sigma_rels` must be a sequence"),
    ((0.05, True), TypeError, "must hold floats"),
  ],
)
def test_bad_sigma_rels_are_rejected(sigma_rels, error, match):
  with pytest.raises(error, match=match):
    optax_ema.power_ema(optax.sgd(0.1), sigma_rels=sigma_rels)


def test_unknown_keyword_is_rejected():
  with pytest.raises(TypeError, match=r"unexpected keyword argument.*foo"):
    optax_ema.power_ema(optax.sgd(0.1), foo=0.9)


def test_optimizer_by_name():
  tx = optax_ema.power_ema("sgd", learning_rate=0.5)
  params = {"w": jnp.ones(2)}
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.5, -0.5])


def test_missing_params_is_an_error():
  tx = optax_ema.power_ema(optax.sgd(0.1))
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="power_ema needs the current parameters"):
    tx.update(params, tx.init(params))


def test_params_of_another_structure_is_an_error():
  tx = optax_ema.power_ema(optax.sgd(0.1))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="`params` does not have the"):
    tx.update({"v": jnp.ones(2)}, state, {"v": jnp.ones(2)})


def test_agrees_with_moving_average_on_a_power_decay_schedule():
  # The same recursion expressed through the core wrapper with EDM2's decay.
  from optax_ema._power_math import power_decay

  g = _gamma(0.10)
  rng = np.random.default_rng(1)
  grads = [jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(30)]
  _, power_state, _ = helpers.run_recording(
    optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.10,)), jnp.zeros(3), grads
  )
  tx = optax_ema.moving_average(optax.sgd(0.1), lambda c: power_decay(c, g))
  _, ma_state, _ = helpers.run_recording(tx, jnp.zeros(3), grads)
  np.testing.assert_allclose(
    optax_ema.averaged_params(power_state),
    optax_ema.averaged_params(ma_state),
    rtol=1e-5,
  )


def test_inside_multisteps_the_average_moves_only_on_real_steps():
  tx = optax.MultiSteps(optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.10,)), 2)
  params = jnp.zeros(2)
  state = tx.init(params)
  xs = []
  for k in range(6):
    updates, state = tx.update(-jnp.ones(2) * (k + 1), state, params)
    params = optax.apply_updates(params, updates)
    if k % 2 == 1:
      xs.append(np.asarray(params))
  inner = state.inner_opt_state
  assert int(inner.count) == 3
  np.testing.assert_allclose(
    inner.averages["0.1"], _closed_form(xs, _gamma(0.10)), rtol=1e-5
  )
