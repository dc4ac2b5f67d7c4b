"""debias=True against a NumPy restatement of zero-debiased EMA (haiku's).

Reference: the average starts at 0 with weight w = 0; every step
a <- d a + (1 - d) x, w <- d w + (1 - d) (so w = 1 - prod(d)); the value is
a / w. With sequential_update=True (the default) x is the post-update params.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import schedules

import helpers

LR = 0.3


def _grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      "m": rng.normal(size=(3, 2)).astype(np.float32),
      "v": rng.normal(size=4).astype(np.float32),
    }
    for _ in range(steps)
  ]


def _params():
  return {
    "m": np.arange(6, dtype=np.float32).reshape(3, 2) / 3.0,
    "v": np.array([1.0, -1.0, 2.0, 0.5], np.float32),
  }


def _np_debiased(params, grads, decay_at, start_step=0):
  """float64 reference; ``decay_at(t)`` gives the decay at count ``t``."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  a = {k: np.zeros_like(v) for k, v in p.items()}
  w = 0.0
  for t, g in enumerate(grads):
    p = {k: p[k] - LR * g[k] for k in p}
    # The decay is a float32 number (as in TFA), the rest float64.
    d = 0.0 if t < start_step else float(np.float32(decay_at(t)))
    a = {k: d * a[k] + (1 - d) * p[k] for k in p}
    w = d * w + (1 - d)
  return {k: a[k] / w for k in a}, w


def _assert_tree_close(got, want, rtol=2e-5, atol=1e-6):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize(
  "decay, decay_at",
  [
    (0.9, lambda t: 0.9),
    (0.999, lambda t: 0.999),
    (schedules.warmup(0.99, power=0.75), lambda t: min(0.99, 1 - (1 + t) ** -0.75)),
    (
      lambda c: 0.5 + 0.4 * jnp.sin(c.astype(jnp.float32)) ** 2,
      lambda t: 0.5 + 0.4 * np.sin(t) ** 2,
    ),
  ],
)
def test_debias_matches_numpy_reference(decay, decay_at):
  grads = _grads(25)
  tx = optax_ema.moving_average(optax.sgd(LR), decay, debias=True)
  _, state = helpers.run(tx, _params(), grads)
  want, w = _np_debiased(_params(), grads, decay_at)
  _assert_tree_close(optax_ema.averaged_params(state), want)
  assert isinstance(state.average, optax_ema.DebiasedAverage)
  assert float(state.average.weight) == pytest.approx(w, rel=1e-5)


def test_debias_with_start_step_matches_numpy():
  grads = _grads(12, seed=1)
  tx = optax_ema.moving_average(optax.sgd(LR), 0.8, debias=True, start_step=4)
  _, state = helpers.run(tx, _params(), grads)
  want, _ = _np_debiased(_params(), grads, lambda t: 0.8, start_step=4)
  _assert_tree_close(optax_ema.averaged_params(state), want)


def test_debiased_average_of_constant_params_is_exact_from_the_first_step():
  params = {"w": jnp.array([3.0, -7.0, 0.25])}
  tx = optax_ema.moving_average(optax.sgd(0.0), 0.999, debias=True)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(
      optax_ema.averaged_params(state)["w"], params["w"], rtol=1e-6
    )
  # Without debiasing a zero-started average would be 0.003 * params here;
  # the stored (biased) tree is exactly that.
  np.testing.assert_allclose(
    state.average.average["w"], (1 - 0.999**3) * np.asarray(params["w"]), rtol=1e-4
  )


def test_debias_keeps_dtypes_and_non_float_leaves():
  params = {"h": jnp.ones(3, jnp.bfloat16), "i": jnp.array([1, 2], jnp.int32)}
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=True)
  state = tx.init(params)
  assert state.average.average["h"].dtype == jnp.float32
  assert float(state.average.weight) == 0.0  # nothing averaged yet
  grads = {"h": jnp.full(3, 0.5, jnp.bfloat16), "i": jnp.zeros(2, jnp.int32)}
  _, state = tx.update(grads, state, params)
  avg = optax_ema.averaged_params(state, params)
  assert avg["h"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(avg["h"], np.float32), 0.5)
  np.testing.assert_array_equal(avg["i"], [1, 2])


def test_debiased_average_reads_as_the_params_before_the_first_update():
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=True)
  state = tx.init(params)
  np.testing.assert_array_equal(optax_ema.averaged_params(state)["w"], [1.0, -2.0])
  np.testing.assert_array_equal(
    optax_ema.averaged_params(state, params)["w"], [1.0, -2.0]
  )


def test_debiased_average_reads_as_the_params_until_it_first_averages():
  # update_every=3: steps 1 and 2 do not average (nothing is averaged yet:
  # the read falls back to the params given); the third averages params3
  # alone, with full weight.
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=True, update_every=3)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
    params = optax.apply_updates(params, updates)
    read = optax_ema.averaged_params(state, params)["w"]
    np.testing.assert_allclose(read, params["w"], rtol=1e-6)
  for _ in range(3):  # from here on it is an average: it lags the params
    updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
    params = optax.apply_updates(params, updates)
  read = optax_ema.averaged_params(state, params)["w"]
  assert np.all(np.asarray(read) > np.asarray(params["w"]))


def test_debias_with_mask_keeps_masked_leaves_from_params():
  params = {"a": jnp.ones(2), "b": jnp.full(2, 5.0)}
  tx = optax_ema.moving_average(
    optax.sgd(1.0), 0.5, debias=True, mask={"a": True, "b": False}
  )
  state = tx.init(params)
  assert isinstance(state.average.average["b"], optax.MaskedNode)
  updates, state = tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state, params)
  params = optax.apply_updates(params, updates)
  avg = optax_ema.averaged_params(state, params)
  np.testing.assert_allclose(avg["a"], [0.0, 0.0])  # one step: the new params
  np.testing.assert_allclose(avg["b"], [4.0, 4.0])


def test_debias_off_is_the_default_state_layout():
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=False)
  state = tx.init({"w": jnp.ones(2)})
  assert isinstance(state.average, dict)


def test_debias_must_be_a_bool():
  with pytest.raises(TypeError, match="`debias`"):
    optax_ema.moving_average(optax.sgd(1.0), 0.9, debias=1)


def test_per_leaf_debias_matches_numpy_with_one_weight_per_leaf():
  grads = _grads(10, seed=2)
  tx = optax_ema.moving_average(
    optax.sgd(LR), schedules.per_leaf({"m": 0.95, "v": 0.6}), debias=True
  )
  _, state = helpers.run(tx, _params(), grads)
  want_m, w_m = _np_debiased(_params(), grads, lambda t: 0.95)
  want_v, w_v = _np_debiased(_params(), grads, lambda t: 0.6)
  got = optax_ema.averaged_params(state)
  np.testing.assert_allclose(got["m"], want_m["m"], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got["v"], want_v["v"], rtol=2e-5, atol=1e-6)
  # One weight per array leaf, in jax.tree.leaves order ("m", "v").
  np.testing.assert_allclose(state.average.weight, [w_m, w_v], rtol=1e-5)


def test_tree_map_params_sees_only_the_params_shaped_trees():
  tx = optax_ema.moving_average(
    optax.sgd(LR), (0.9, schedules.per_leaf({"m": 0.9, "v": 0.5})), debias=True
  )
  state = tx.init(jax.tree.map(jnp.asarray, _params()))
  shapes = optax.tree_map_params(
    tx, lambda x: x.shape, state, transform_non_params=lambda x: "other"
  )
  for avg in shapes.average.averages:
    assert avg.average == {"m": (3, 2), "v": (4,)}
    assert avg.weight == "other"
