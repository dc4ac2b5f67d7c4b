"""The average moves exactly on the steps where the wrapped optimizer applies an update.

``optax.MultiSteps`` micro-steps and the steps ``optax.apply_if_finite``
rejects apply no update; the average neither moves nor counts on them, in
both orders of the wrappers, and found through ``optax.chain``,
``optax.named_chain`` and ``optax.inject_hyperparams``. Expected values:
NumPy restatements of the EMA over the real steps only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers

LR, K, MICRO_STEPS = 0.5, 3, 12
GRADS = helpers.grads(MICRO_STEPS, seed=4)


def _real_steps():
  """The params after each real (k-th) step: SGD on the mean of k gradients."""
  p = helpers.as_np(helpers.params())
  out = []
  for i in range(0, MICRO_STEPS, K):
    window = GRADS[i : i + K]
    mean = jax.tree.map(
      lambda *g: np.mean([np.asarray(x, np.float64) for x in g], 0), *window
    )
    p = jax.tree.map(lambda x, g: x - LR * g, p, mean)
    out.append(p)
  return out


def _ramp(t):
  return min(0.9, (1 + t) / (10 + t))  # dynamic_decay, t counting real steps


def _ema(**kwargs):
  return optax_ema.moving_average(optax.sgd(LR), 0.9, dynamic_decay=True, **kwargs)


ORDERS = {
  "moving_average(MultiSteps)": lambda: _ema_around(optax.MultiSteps(optax.sgd(LR), K)),
  "MultiSteps(moving_average)": lambda: optax.MultiSteps(_ema(), K),
}


def _ema_around(inner):
  return optax_ema.moving_average(inner, 0.9, dynamic_decay=True)


@pytest.mark.parametrize("order", list(ORDERS))
def test_inside_multisteps_the_average_moves_only_on_real_steps(order):
  tx = ORDERS[order]()
  params, state = helpers.run(tx, helpers.params(), GRADS)
  real = _real_steps()
  want = helpers.np_ema(helpers.params(), real, [_ramp(t) for t in range(len(real))])
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert int(optax_ema.diagnostics(state, params)["count"]) == MICRO_STEPS // K


def test_both_orders_of_multisteps_give_the_same_average():
  states = {}
  for order, make in ORDERS.items():
    _, states[order] = helpers.run(make(), helpers.params(), GRADS)
  a, b = (optax_ema.averaged_params(s) for s in states.values())
  helpers.assert_trees_identical(a, b)


def test_between_real_steps_the_average_is_untouched():
  tx = ORDERS["moving_average(MultiSteps)"]()
  params, state = helpers.params(), tx.init(helpers.params())
  update = jax.jit(tx.update)
  history = []
  for g in GRADS[: 2 * K]:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append((int(state.count), jax.tree.map(np.asarray, state.average)))
  assert [c for c, _ in history] == [0, 0, 1, 1, 1, 2]
  helpers.assert_trees_identical(history[0][1], helpers.params())
  helpers.assert_trees_identical(history[3][1], history[2][1])
  helpers.assert_trees_identical(history[4][1], history[2][1])


def test_a_step_skipped_by_should_skip_update_fn_is_not_averaged():
  inner = optax.MultiSteps(
    optax.sgd(LR), K, should_skip_update_fn=optax.skip_not_finite
  )
  tx = optax_ema.moving_average(inner, 0.5)
  bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), GRADS[0])
  grads = [*GRADS[:K], bad, *GRADS[K : 2 * K]]
  _, state = helpers.run(tx, helpers.params(), grads)
  real = _real_steps()[:2]  # the NaN micro-step is dropped, as MultiSteps drops it
  want = helpers.np_ema(helpers.params(), real, [0.5, 0.5])
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert int(state.count) == 2


def _nan_like(tree):
  return jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), tree)


def test_a_step_apply_if_finite_rejects_is_neither_averaged_nor_counted():
  tx = optax_ema.moving_average(optax.apply_if_finite(optax.sgd(LR), 5), 0.5)
  grads = [GRADS[0], _nan_like(GRADS[1]), GRADS[2]]
  _, state = helpers.run(tx, helpers.params(), grads)
  values = helpers.np_sgd(helpers.params(), [GRADS[0], GRADS[2]], LR)
  helpers.assert_tree_close(
    optax_ema.averaged_params(state),
    helpers.np_ema(helpers.params(), values, [0.5] * 2),
  )
  assert int(state.count) == 2


def test_after_max_consecutive_errors_the_nonfinite_update_is_not_averaged():
  # apply_if_finite applies the third NaN update (max_consecutive_errors=2):
  # the params become NaN, the average keeps its last finite value.
  tx = optax_ema.moving_average(optax.apply_if_finite(optax.sgd(LR), 2), 0.5)
  grads = [GRADS[0], *[_nan_like(GRADS[0])] * 3]
  params, state = helpers.run(tx, helpers.params(), grads)
  assert np.isnan(np.asarray(params["a"])).all()
  values = helpers.np_sgd(helpers.params(), GRADS[:1], LR)
  helpers.assert_tree_close(
    optax_ema.averaged_params(state), helpers.np_ema(helpers.params(), values, [0.5])
  )
  assert int(state.count) == 1


WRAPPERS = {
  "chain": lambda inner: optax.chain(optax.clip(100.0), inner),
  "named_chain": lambda inner: optax.named_chain(
    ("clip", optax.clip(100.0)), ("opt", inner)
  ),
  "inject_hyperparams": lambda inner: optax.inject_hyperparams(
    lambda learning_rate: optax.chain(optax.scale(1.0), inner)
  )(learning_rate=1.0),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_the_gate_is_found_through_pass_through_wrappers(wrapper):
  tx = _ema_around(WRAPPERS[wrapper](optax.MultiSteps(optax.sgd(LR), K)))
  _, state = helpers.run(tx, helpers.params(), GRADS)
  real = _real_steps()
  want = helpers.np_ema(helpers.params(), real, [_ramp(t) for t in range(len(real))])
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert int(state.count) == len(real)


def test_power_ema_and_swa_count_real_steps_too():
  real = _real_steps()
  power = optax_ema.power_ema(optax.MultiSteps(optax.sgd(LR), K), sigma_rels=(0.1,))
  _, state = helpers.run(power, helpers.params(), GRADS)
  gamma = optax_ema.posthoc.sigma_rel_to_gamma(0.1)
  decays = [(1 - 1 / t) ** (gamma + 1) for t in range(1, len(real) + 1)]
  want = helpers.np_ema(helpers.params(), real, decays)
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  # SWA: a snapshot every 2 real steps from the first: real steps 1 and 3.
  swa = optax_ema.swa(optax.MultiSteps(optax.sgd(LR), K), 0, 2)
  _, state = helpers.run(swa, helpers.params(), GRADS)
  want = jax.tree.map(lambda x, y: (x + y) / 2, real[0], real[2])
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-5)
  assert int(state.count) == len(real)


def _forwarding_conditionals(tx):
  params = {"w": jnp.ones((64, 32))}

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, tx.init(params), params)
    .compile()
  )
  branches = helpers.conditional_branches(compiled.as_text())
  forwarding = [b for b in branches if any(k <= helpers.FORWARDING for k in b)]
  return len(forwarding), compiled.memory_analysis().temp_size_in_bytes


def test_a_micro_step_does_no_average_arithmetic_in_the_compiled_step():
  inner = optax.MultiSteps(optax.sgd(0.1), K)
  alone, _ = _forwarding_conditionals(optax_ema.moving_average(optax.sgd(0.1), 0.9))
  assert alone == 0  # no gate, no conditional
  wrapped, temp = _forwarding_conditionals(optax_ema.moving_average(inner, 0.9))
  plain, plain_temp = _forwarding_conditionals(inner)
  # One more conditional than MultiSteps alone, whose other branch forwards
  # the average untouched, and no parameter-sized temporary for it.
  assert wrapped == plain + 1
  assert temp <= plain_temp + 64 * 32 * 4 // 4


def test_a_schedule_made_static_under_inject_hyperparams_counts_real_steps():
  # inject_hyperparams would evaluate the schedule on its own count of calls
  # (micro-steps included); static, moving_average evaluates it.
  schedule = lambda c: jnp.where(c < 2, 0.0, 0.5)
  plain = optax_ema.moving_average(optax.MultiSteps(optax.sgd(LR), K), schedule)
  injected = optax.inject_hyperparams(
    optax_ema.moving_average, static_args=("average_decay",)
  )(optimizer=optax.MultiSteps(optax.sgd(LR), K), average_decay=schedule)
  _, a = helpers.run(plain, helpers.params(), GRADS)
  _, b = helpers.run(injected, helpers.params(), GRADS)
  helpers.assert_trees_identical(
    optax_ema.averaged_params(a), optax_ema.averaged_params(b)
  )
  real = _real_steps()
  want = helpers.np_ema(helpers.params(), real, [0.0, 0.0, 0.5, 0.5])
  helpers.assert_tree_close(optax_ema.averaged_params(b), want, rtol=1e-5)


@pytest.mark.parametrize("order", ["inside", "outside"])
def test_after_max_consecutive_errors_skip_nonfinite_keeps_the_average_finite(order):
  # max_consecutive_errors=1: the second NaN step is applied and the params
  # go NaN; without skip_nonfinite the next steps would average them.
  ema = lambda inner: optax_ema.moving_average(inner, 0.5, skip_nonfinite=True)
  if order == "inside":
    tx = ema(optax.apply_if_finite(optax.sgd(LR), 1))
  else:
    tx = optax.apply_if_finite(ema(optax.sgd(LR)), 1)
  grads = [GRADS[0], _nan_like(GRADS[1]), _nan_like(GRADS[1]), GRADS[2]]
  params, state = helpers.run(tx, helpers.params(), grads)
  assert np.isnan(np.asarray(params["a"])).all()
  values = helpers.np_sgd(helpers.params(), GRADS[:1], LR)
  helpers.assert_tree_close(
    optax_ema.averaged_params(state), helpers.np_ema(helpers.params(), values, [0.5])
  )
  assert int(optax_ema.diagnostics(state, params)["count"]) == 1


PARTIAL_MULTISTEPS = {
  "masked": lambda: optax.masked(
    optax.MultiSteps(optax.sgd(LR), K), {"a": True, "b": False, "s": False}
  ),
  "multi_transform": lambda: optax.multi_transform(
    {"acc": optax.MultiSteps(optax.sgd(LR), K), "plain": optax.sgd(LR)},
    {"a": "acc", "b": "plain", "s": "plain"},
  ),
  "masked_in_a_chain": lambda: optax.chain(
    optax.clip(1.0),
    optax.masked(
      optax.chain(optax.MultiSteps(optax.sgd(LR), K)),
      {"a": True, "b": False, "s": True},
    ),
  ),
}


@pytest.mark.parametrize("kind", list(PARTIAL_MULTISTEPS))
@pytest.mark.parametrize(
  "wrapper", [optax_ema.moving_average, optax_ema.power_ema, optax_ema.swa]
)
def test_multisteps_inside_masked_or_multi_transform_is_refused_with_the_fix(
  kind, wrapper
):
  tx = wrapper(PARTIAL_MULTISTEPS[kind]())
  with pytest.raises(ValueError) as info:
    tx.init(helpers.params())
  message = str(info.value)
  assert "`optimizer`" in message and "optax.MultiSteps" in message
  assert ("optax.masked" if kind != "multi_transform" else "optax.multi_transform") in (
    message
  )
  assert "around the whole optimizer" in message


def test_moving_average_of_a_masked_optimizer_averages_every_step():
  # optax.masked passes the masked-out leaves' updates through unchanged:
  # those params move by +g, the others by -LR g; the average follows both.
  mask = {"a": True, "b": {"c": False}, "s": True}
  tx = optax_ema.moving_average(optax.masked(optax.sgd(LR), mask), 0.5)
  grads = helpers.grads(4, seed=8)
  _, state = helpers.run(tx, helpers.params(), grads)
  p = helpers.as_np(helpers.params())
  seen = []
  for g in grads:
    g = helpers.as_np(g)
    p = {
      "a": p["a"] - LR * g["a"],
      "b": {"c": p["b"]["c"] + g["b"]["c"]},
      "s": p["s"] - LR * g["s"],
    }
    seen.append(p)
  want = helpers.np_ema(helpers.params(), seen, [0.5] * 4)
  helpers.assert_tree_close(optax_ema.averaged_params(state), want, rtol=1e-6)
  assert int(state.count) == 4


def test_multisteps_around_a_masked_optimizer_is_accepted():
  tx = optax_ema.moving_average(
    optax.MultiSteps(
      optax.masked(optax.sgd(LR), {"a": True, "b": False, "s": True}), K
    ),
    0.5,
  )
  _, state = helpers.run(tx, helpers.params(), GRADS)
  assert int(state.count) == MICRO_STEPS // K
