"""``overwrite_every=k`` (Switch EMA): every k-th step the params move onto the average.

NumPy restatement: SGD, then the EMA of the new params; on every k-th step
the params are replaced by that new average. Training is otherwise the
optimizer's own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers

LR, DECAY, STEPS = 0.3, 0.8, 12
GRADS = helpers.grads(STEPS, seed=7)


def _np_switch(k, decay=DECAY, params=None, grads=GRADS, update_every=1):
  """(params, average) after each step of SGD + EMA + overwrite every k."""
  p = helpers.as_np(helpers.params() if params is None else params)
  a = jax.tree.map(np.copy, p)
  history = []
  for t, g in enumerate(grads, start=1):
    p = jax.tree.map(lambda x, y: x - LR * np.asarray(y, np.float64), p, g)
    if t % update_every == 0:
      w = 1 - float(np.float32(decay)) ** update_every
      a = jax.tree.map(lambda a_, x, w=w: a_ - (a_ - x) * w, a, p)
    if t % k == 0:
      p = jax.tree.map(np.copy, a)
    history.append((p, a))
  return history


def _history(tx, params=None, grads=GRADS, which=None):
  params = helpers.params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append((params, optax_ema.averaged_params(state, params, which=which)))
  return out, state


@pytest.mark.parametrize("k", [1, 3, 5])
def test_params_move_onto_the_average_every_kth_step(k):
  tx = optax_ema.moving_average(optax.sgd(LR), DECAY, overwrite_every=k)
  got, state = _history(tx)
  for t, ((p, a), (want_p, want_a)) in enumerate(
    zip(got, _np_switch(k), strict=True), 1
  ):
    helpers.assert_tree_close(a, want_a, rtol=1e-5, atol=1e-6)
    helpers.assert_tree_close(p, want_p, rtol=1e-5, atol=1e-6)
    if t % k == 0:  # "so that optax.apply_updates leaves params equal to it"
      helpers.assert_tree_close(p, helpers.as_np(a), rtol=1e-7, atol=1e-7)
  assert int(state.count) == STEPS


def test_off_by_default_and_training_unchanged_between_overwrites():
  plain, _ = _history(optax_ema.moving_average(optax.sgd(LR), DECAY))
  switch, _ = _history(
    optax_ema.moving_average(optax.sgd(LR), DECAY, overwrite_every=6)
  )
  for t in range(5):  # identical until the first overwrite
    helpers.assert_trees_identical(plain[t][0], switch[t][0])
  assert not np.allclose(plain[5][0]["a"], switch[5][0]["a"])


def test_masked_out_and_non_float_leaves_are_never_overwritten():
  params = {**helpers.params(), "n": jnp.array([3, 4], jnp.int32)}
  grads = [{**g, "n": jnp.array([1, 1], jnp.int32)} for g in GRADS[:4]]
  tx = optax_ema.moving_average(
    optax.identity(),
    0.5,
    mask={"a": True, "b": False, "s": True, "n": True},
    overwrite_every=2,
  )
  got, _ = _history(tx, params, grads)
  # "b" follows its updates alone: params + sum of updates.
  want_b = np.asarray(params["b"]["c"]) + sum(np.asarray(g["b"]["c"]) for g in grads)
  np.testing.assert_allclose(got[-1][0]["b"]["c"], want_b, rtol=1e-6)
  np.testing.assert_array_equal(got[-1][0]["n"], [7, 8])


def test_several_averages_overwrite_with_the_one_picked():
  tx = optax_ema.moving_average(
    optax.sgd(LR),
    {"fast": 0.5, "slow": DECAY},
    overwrite_every=4,
    overwrite_with="slow",
  )
  got, _ = _history(tx, which="slow")
  want = _np_switch(4)
  helpers.assert_tree_close(got[-1][0], want[-1][0], rtol=1e-5, atol=1e-6)
  by_decay = optax_ema.moving_average(
    optax.sgd(LR), (0.5, DECAY), overwrite_every=4, overwrite_with=DECAY
  )
  got_by_decay, _ = _history(by_decay, which=1)
  helpers.assert_trees_identical(got[-1][0], got_by_decay[-1][0])


def test_with_update_every_the_overwrite_follows_an_averaging_step():
  tx = optax_ema.moving_average(optax.sgd(LR), DECAY, update_every=2, overwrite_every=6)
  got, _ = _history(tx)
  want = _np_switch(6, update_every=2)
  helpers.assert_tree_close(got[-1][0], want[-1][0], rtol=1e-5, atol=1e-6)


def test_a_debiased_average_overwrites_debiased():
  tx = optax_ema.moving_average(optax.sgd(LR), DECAY, debias=True, overwrite_every=3)
  got, _ = _history(tx)
  # Debiased: the first average is the first params, exactly.
  p = helpers.np_sgd(helpers.params(), GRADS[:3], LR)
  d = float(np.float32(DECAY))
  weights = np.array([d**2, d, 1.0]) * (1 - d)
  want = jax.tree.map(
    lambda *x: sum(w * v for w, v in zip(weights, x, strict=True)) / weights.sum(), *p
  )
  helpers.assert_tree_close(got[2][0], want, rtol=1e-5, atol=1e-6)


def test_no_overwrite_on_a_multisteps_micro_step():
  inner = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2)
  tx = optax_ema.moving_average(inner, DECAY, overwrite_every=2)
  got, state = _history(tx)
  # Real steps are the even micro-steps; the 2nd real step (micro-step 4)
  # overwrites. Micro-steps in between leave the params where they were.
  helpers.assert_trees_identical(got[0][0], helpers.params())
  helpers.assert_tree_close(got[3][0], helpers.as_np(got[3][1]), rtol=1e-7, atol=1e-7)
  assert not np.allclose(got[1][0]["a"], got[1][1]["a"])
  assert int(state.count) == STEPS // 2


def test_bfloat16_params_land_on_the_rounded_average():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), helpers.params())
  grads = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in GRADS[:4]]
  tx = optax_ema.moving_average(optax.sgd(LR), DECAY, overwrite_every=4)
  got, _ = _history(tx, params, grads)
  p, a = got[-1]
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(a), strict=True):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize(
  ("kwargs", "error"),
  [({"overwrite_every": 0}, ValueError), ({"overwrite_every": 2.0}, TypeError)],
)
def test_bad_overwrite_every(kwargs, error):
  with pytest.raises(error, match="`overwrite_every`"):
    optax_ema.moving_average(optax.sgd(LR), DECAY, **kwargs)
