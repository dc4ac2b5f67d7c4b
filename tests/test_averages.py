"""Several decays in one state, and per-leaf decays, against separate runs.

The reference for "several" and "per-leaf" is a NumPy restatement of the
single-decay EMA (a <- a - (a - x) * (1 - d), x the post-update params,
float32 decay), run once per decay.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import schedules

LR = 0.1
STEPS = 12


def _params():
  return {
    "embed": np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(4, 2),
    "dense": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)},
  }


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), _params())
    for _ in range(STEPS)
  ]


def _np_ema(decay_of_leaf):
  """float64 EMA of the sgd trajectory; ``decay_of_leaf(path, t)`` -> decay."""
  params = jax.tree.map(lambda x: x.astype(np.float64), _params())
  avg = params
  for t, g in enumerate(_grads()):
    params = jax.tree.map(lambda p, gg: p - LR * gg, params, g)

    def step(path, a, p, t=t):
      d = float(np.float32(decay_of_leaf(jax.tree_util.keystr(path), t)))
      return a - (a - p) * (1 - d)

    avg = jax.tree_util.tree_map_with_path(step, avg, params)
  return avg


def _run(tx):
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in _grads():
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_tree_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)


def test_tuple_of_decays_matches_separate_runs():
  decays = (0.5, 0.9, 0.99)
  _, state = _run(optax_ema.moving_average(optax.sgd(LR), decays))
  assert isinstance(state.average, optax_ema.Averages)
  for i, d in enumerate(decays):
    want = _np_ema(lambda path, t, d=d: d)
    _assert_tree_close(optax_ema.averaged_params(state, which=i), want)
    # The same numbers as a single-decay run of the library.
    _, single = _run(optax_ema.moving_average(optax.sgd(LR), d))
    _assert_tree_close(
      optax_ema.averaged_params(state, which=i),
      jax.tree.map(np.asarray, optax_ema.averaged_params(single)),
    )


def test_dict_of_decays_and_schedules_picked_by_key_index_or_value():
  sched = schedules.tf_ramp(0.99)
  tx = optax_ema.moving_average(optax.sgd(LR), {"fast": 0.6, "ramp": sched})
  params, state = _run(tx)
  fast = optax_ema.averaged_params(state, params, which="fast")
  _assert_tree_close(fast, _np_ema(lambda path, t: 0.6))
  _assert_tree_close(optax_ema.averaged_params(state, which=0), fast)
  _assert_tree_close(optax_ema.averaged_params(state, which=0.6), fast)
  # 0-d arrays count as the numbers they hold.
  _assert_tree_close(optax_ema.averaged_params(state, which=jnp.float32(0.6)), fast)
  _assert_tree_close(optax_ema.averaged_params(state, which=np.int64(0)), fast)
  ramp = optax_ema.averaged_params(state, which="ramp")
  _assert_tree_close(ramp, _np_ema(lambda path, t: min(0.99, (1 + t) / (10 + t))))
  assert state.average.keys == ("fast", "ramp")
  assert state.average.decays == (0.6, None)


def test_several_averages_without_which_is_an_error_listing_the_choices():
  _, state = _run(optax_ema.moving_average(optax.sgd(LR), {"fast": 0.9, "slow": 0.99}))
  with pytest.raises(ValueError, match=r"2 averages.*'fast' \(decay 0.9\).*'slow'"):
    optax_ema.averaged_params(state)
  with pytest.raises(ValueError, match=r"`which`='medium' picks none.*'fast'"):
    optax_ema.averaged_params(state, which="medium")
  with pytest.raises(ValueError, match="picks none"):
    optax_ema.averaged_params(state, which=0.5)
  with pytest.raises(ValueError, match="picks none"):
    optax_ema.averaged_params(state, which=2)


def test_single_average_rejects_which():
  _, state = _run(optax_ema.moving_average(optax.sgd(LR), 0.9))
  with pytest.raises(ValueError, match="`which` must be None"):
    optax_ema.averaged_params(state, which=0)


def test_several_averages_state_paths_are_readable_and_jit_stable():
  tx = optax_ema.moving_average(optax.sgd(LR), {"fast": 0.9, "slow": 0.99})
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)
  ]
  assert ".average['fast']['dense']['b']" in paths
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for g in _grads()[:3]:
    params, state = step(params, state, g)
  assert len(traces) == 1


def test_per_leaf_decay_matches_separate_runs_per_leaf():
  prefix = {"embed": 0.99, "dense": {"w": 0.5, "b": 0.8}}
  _, state = _run(optax_ema.moving_average(optax.sgd(LR), schedules.per_leaf(prefix)))

  def decay_of(path, t):
    return 0.99 if "embed" in path else 0.5 if "'w'" in path else 0.8

  _assert_tree_close(optax_ema.averaged_params(state), _np_ema(decay_of))


def test_per_leaf_schedules_with_mask_skip_masked_leaves():
  prefix = {"embed": schedules.warmup(0.999), "dense": 0.7}
  tx = optax_ema.moving_average(
    optax.sgd(LR),
    schedules.per_leaf(prefix),
    mask={"embed": True, "dense": {"w": True, "b": False}},
  )
  params, state = _run(tx)
  assert isinstance(state.average["dense"]["b"], optax.MaskedNode)
  got = optax_ema.averaged_params(state, params)

  def decay_of(path, t):
    if "embed" in path:
      return min(0.999, 1 - (1 + t) ** (-2 / 3))
    return 0.7

  want = _np_ema(decay_of)
  np.testing.assert_allclose(got["embed"], want["embed"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    got["dense"]["w"], want["dense"]["w"], rtol=1e-5, atol=1e-6
  )
  # The masked leaf is the current params, not an average.
  np.testing.assert_array_equal(got["dense"]["b"], params["dense"]["b"])


def test_several_per_leaf_decays_in_one_state():
  tx = optax_ema.moving_average(
    optax.sgd(LR),
    (0.9, schedules.per_leaf({"embed": 0.99, "dense": 0.5})),
  )
  _, state = _run(tx)
  _assert_tree_close(
    optax_ema.averaged_params(state, which=0), _np_ema(lambda p, t: 0.9)
  )
  _assert_tree_close(
    optax_ema.averaged_params(state, which=1),
    _np_ema(lambda p, t: 0.99 if "embed" in p else 0.5),
  )


def test_per_leaf_prefix_that_does_not_fit_params_is_a_clear_error():
  tx = optax_ema.moving_average(optax.sgd(LR), schedules.per_leaf({"other": 0.9}))
  params = jax.tree.map(jnp.asarray, _params())
  with pytest.raises(ValueError, match="per_leaf tree must be a pytree prefix"):
    tx.init(params)


@pytest.mark.parametrize(
  "decay, err, match",
  [
    ((), ValueError, "empty"),
    ({}, ValueError, "empty"),
    ((0.9, 1.5), ValueError, r"`average_decay\[1\]` must be in \[0, 1\]"),
    ({"a": 0.9, "b": "x"}, TypeError, r"`average_decay\['b'\]`"),
    ({1: 0.9}, TypeError, "dict keys must be strings"),
    (schedules.per_leaf({"a": 2.0}), ValueError, r"`average_decay\['a'\]`"),
  ],
)
def test_bad_several_or_per_leaf_decays_raise_at_construction(decay, err, match):
  with pytest.raises(err, match=match):
    optax_ema.moving_average(optax.sgd(LR), decay)
