"""moving_average composed with optax's own wrappers.

Expected values come from the NumPy references of ``helpers`` (the update
rule ``average <- average - (average - x) * (1 - decay)`` with ``x`` the
params after the step), never from the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers

LR = 0.5
GRADS = [
  {"a": np.array([0.1, -0.2], np.float32), "b": np.array([0.3], np.float32)},
  {"a": np.array([0.4, 0.0], np.float32), "b": np.array([-0.1], np.float32)},
  {"a": np.array([-0.3, 0.2], np.float32), "b": np.array([0.2], np.float32)},
]


def _params():
  return {"a": jnp.array([1.0, 2.0]), "b": jnp.array([-1.0])}


def _assert_tree_close(got, want):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-7)


def _clipped(grads_seq, max_norm):
  """NumPy's optax.clip_by_global_norm of each gradient, in float64."""
  out = []
  for g in map(helpers.as_np, grads_seq):
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    out.append({k: v * min(1.0, max_norm / norm) for k, v in g.items()})
  return out


def test_outer_wrapper_around_a_chain_matches_numpy():
  inner = optax.chain(optax.clip_by_global_norm(0.3), optax.sgd(LR))
  tx = optax_ema.moving_average(inner, average_decay=0.8)
  params, state = helpers.run(tx, _params(), GRADS, jit=False)
  want_p, want_avg = helpers.np_sgd_ema(_params(), _clipped(GRADS, 0.3), LR, 0.8)
  _assert_tree_close(params, want_p)
  _assert_tree_close(optax_ema.averaged_params(state), want_avg)


def test_last_element_of_chain_matches_numpy():
  tx = optax.chain(
    optax.clip_by_global_norm(0.3),
    optax_ema.moving_average(optax.sgd(LR), average_decay=0.8),
  )
  params, state = helpers.run(tx, _params(), GRADS, jit=False)
  want_p, want_avg = helpers.np_sgd_ema(_params(), _clipped(GRADS, 0.3), LR, 0.8)
  _assert_tree_close(params, want_p)
  _assert_tree_close(optax_ema.averaged_params(state), want_avg)


def test_inside_named_chain_is_found_by_name_and_by_search():
  tx = optax.named_chain(
    ("clip", optax.clip(10.0)),
    ("ema", optax_ema.moving_average(optax.sgd(LR), average_decay=0.6)),
  )
  _, state = helpers.run(tx, _params(), GRADS, jit=False)
  _, want_avg = helpers.np_sgd_ema(_params(), GRADS, LR, 0.6)
  _assert_tree_close(optax_ema.averaged_params(state), want_avg)
  _assert_tree_close(optax_ema.averaged_params(state["ema"]), want_avg)


def test_inject_hyperparams_wraps_moving_average_directly():
  # optax.inject_hyperparams passes every parameter of the factory by
  # keyword, including the `**optimizer_kwargs` catch-all (as an empty dict).
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(LR), average_decay=0.6
  )
  _, state = helpers.run(tx, _params(), GRADS, jit=False)
  _, want_avg = helpers.np_sgd_ema(_params(), GRADS, LR, 0.6)
  _assert_tree_close(optax_ema.averaged_params(state), want_avg)


def test_inject_hyperparams_changes_decay_at_run_time_without_retracing():
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(LR), average_decay=0.5
  )
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  params, state = step(params, state, GRADS[0])
  state.hyperparams["average_decay"] = jnp.asarray(0.9, jnp.float32)
  params, state = step(params, state, GRADS[1])
  assert len(traces) == 1

  p1, avg1 = helpers.np_sgd_ema(_params(), GRADS[:1], LR, 0.5)
  (p2,) = helpers.np_sgd(p1, GRADS[1:2], LR)
  want = helpers.np_ema_step(avg1, p2, 0.9)
  _assert_tree_close(optax_ema.averaged_params(state), want)


def test_multisteps_moves_average_only_on_every_kth_step():
  k = 3
  tx = optax.MultiSteps(
    optax_ema.moving_average(optax.sgd(LR), average_decay=0.5), every_k_schedule=k
  )
  params = _params()
  state = tx.init(params)
  start = {key: np.asarray(v) for key, v in params.items()}
  for i, g in enumerate(GRADS):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    avg = optax_ema.averaged_params(state)
    ma_state = state.inner_opt_state
    if i < k - 1:
      _assert_tree_close(avg, start)
      assert int(ma_state.count) == 0
  mean_grad = {
    key: np.mean([np.asarray(g[key], np.float64) for g in GRADS], axis=0)
    for key in start
  }
  _, want_avg = helpers.np_sgd_ema(start, [mean_grad], LR, 0.5)
  assert int(ma_state.count) == 1
  _assert_tree_close(avg, want_avg)


def _nan_grads():
  return {"a": jnp.array([jnp.nan, 0.1]), "b": jnp.array([0.2])}


def test_apply_if_finite_around_leaves_average_untouched_on_nan_step():
  tx = optax.apply_if_finite(
    optax_ema.moving_average(optax.sgd(LR), average_decay=0.5),
    max_consecutive_errors=5,
  )
  params, state = helpers.run(tx, _params(), GRADS[:1], jit=False)
  before_avg = {k: np.asarray(v) for k, v in optax_ema.averaged_params(state).items()}
  before_count = int(state.inner_state.count)
  updates, state = tx.update(_nan_grads(), state, params)
  params = optax.apply_updates(params, updates)
  _assert_tree_close(optax_ema.averaged_params(state), before_avg)
  assert int(state.inner_state.count) == before_count == 1
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))


def test_apply_if_finite_inside_with_skip_nonfinite_leaves_average_untouched():
  # The inner apply_if_finite turns the NaN step into a zero update; the
  # skipped step must not pull the average nor advance its count.
  tx = optax_ema.moving_average(
    optax.apply_if_finite(optax.sgd(LR), max_consecutive_errors=5),
    average_decay=0.5,
    skip_nonfinite=True,
  )
  params, state = helpers.run(tx, _params(), GRADS[:1], jit=False)
  before_avg = {k: np.asarray(v) for k, v in state.average.items()}
  _updates, state = tx.update(_nan_grads(), state, params)
  _assert_tree_close(state.average, before_avg)
  assert int(state.count) == 1


def test_skip_nonfinite_keeps_previous_average_and_count():
  tx = optax_ema.moving_average(optax.sgd(LR), average_decay=0.5, skip_nonfinite=True)
  params, state = helpers.run(tx, _params(), GRADS[:1], jit=False)
  _, want_avg = helpers.np_sgd_ema(_params(), GRADS[:1], LR, 0.5)
  updates, state = tx.update(_nan_grads(), state, params)
  poisoned = optax.apply_updates(params, updates)
  assert not np.all(np.isfinite(poisoned["a"]))  # the bad step is passed on
  _assert_tree_close(state.average, want_avg)
  assert int(state.count) == 1
  # The next good step continues from the kept average.
  updates, state = tx.update(GRADS[1], state, params)
  params = optax.apply_updates(params, updates)
  _, want_avg = helpers.np_sgd_ema(_params(), GRADS[:2], LR, 0.5)
  _assert_tree_close(state.average, want_avg)
  assert int(state.count) == 2


def test_without_skip_nonfinite_a_nan_step_poisons_the_average():
  tx = optax_ema.moving_average(optax.sgd(LR), average_decay=0.5)
  params, state = helpers.run(tx, _params(), GRADS[:1], jit=False)
  _, state = tx.update(_nan_grads(), state, params)
  assert np.isnan(np.asarray(state.average["a"][0]))


def test_masked_around_moving_average_averages_only_selected_leaves():
  tx = optax.masked(
    optax_ema.moving_average(optax.sgd(LR), average_decay=0.5),
    {"a": True, "b": False},
  )
  params, state = helpers.run(tx, _params(), GRADS, jit=False)
  _want_p, want_avg = helpers.np_sgd_ema(_params(), GRADS, LR, 0.5)
  # optax.masked passes the unselected gradients through unchanged.
  want_b = np.asarray(_params()["b"]) + sum(g["b"] for g in GRADS)
  np.testing.assert_allclose(params["b"], want_b, rtol=1e-6)
  avg = optax_ema.averaged_params(state, params)
  _assert_tree_close({"a": avg["a"]}, {"a": want_avg["a"]})
  np.testing.assert_array_equal(avg["b"], params["b"])
  assert isinstance(state.inner_state.average["b"], optax.MaskedNode)


def test_multi_transform_with_moving_average_on_one_partition():
  tx = optax.multi_transform(
    {
      "ema": optax_ema.moving_average(optax.sgd(LR), average_decay=0.5),
      "plain": optax.sgd(2 * LR),
    },
    {"a": "ema", "b": "plain"},
  )
  params, state = helpers.run(tx, _params(), GRADS, jit=False)
  want_p, want_avg = helpers.np_sgd_ema(_params(), GRADS, LR, 0.5)
  want_b, _ = helpers.np_sgd_ema(
    {"b": _params()["b"]}, [{"b": g["b"]} for g in GRADS], 2 * LR, 0.5
  )
  _assert_tree_close(params, {"a": want_p["a"], "b": want_b["b"]})
  avg = optax_ema.averaged_params(state, params)
  _assert_tree_close(avg, {"a": want_avg["a"], "b": np.asarray(params["b"])})


def test_tree_map_params_maps_the_average_and_leaves_the_count():
  tx = optax.chain(
    optax.clip(1.0), optax_ema.moving_average(optax.adam(0.1), average_decay=0.5)
  )
  params = _params()
  state = tx.init(params)
  marked = optax.tree_map_params(
    tx,
    lambda p: jnp.full(p.shape, 7.0, p.dtype),
    state,
    transform_non_params=lambda x: x,
  )
  ma = marked[1]
  for leaf in jax.tree.leaves(ma.average):
    np.testing.assert_array_equal(leaf, np.full(leaf.shape, 7.0))
  for leaf in jax.tree.leaves((ma.inner_state[0].mu, ma.inner_state[0].nu)):
    np.testing.assert_array_equal(leaf, np.full(leaf.shape, 7.0))
  assert int(ma.count) == 0 and ma.count.dtype == jnp.int32


@pytest.mark.parametrize("wrap", ["jit", "scan"])
def test_runs_under_jit_and_scan_like_the_eager_loop(wrap):
  tx = optax.chain(
    optax.clip(1.0), optax_ema.moving_average(optax.sgd(LR), average_decay=0.7)
  )
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *GRADS)

  def body(carry, g):
    params, state = carry
    updates, state = tx.update(g, state, params)
    return (optax.apply_updates(params, updates), state), None

  params = _params()
  if wrap == "scan":
    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, stacked))(
      (params, tx.init(params))
    )
  else:
    carry = (params, tx.init(params))
    for g in GRADS:
      carry, _ = jax.jit(body)(carry, g)
    params, state = carry
  _, want_avg = helpers.np_sgd_ema(_params(), GRADS, LR, 0.7)
  _assert_tree_close(optax_ema.averaged_params(state), want_avg)
