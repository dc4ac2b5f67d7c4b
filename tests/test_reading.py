"""``averaged_params`` finds the single MovingAverageState wherever it lives.

Setup of TFA's upstream test (var0 = [1, 2], gradient 0.1, SGD(2.0), decay
0.5): after two steps the params are [0.6, 1.6] and the average is
[0.75, 1.75] (one step: [0.8, 1.8] and [0.9, 1.9]).
"""

import warnings

import flax.training.train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

TOL = {"rtol": 1e-6, "atol": 1e-7}
AVG_AFTER_TWO = {"w": [0.75, 1.75], "b": [2.75]}
PARAMS_AFTER_TWO = {"w": [0.6, 1.6], "b": [2.6]}


def _params(dtype=jnp.float32):
  return {"w": jnp.array([1.0, 2.0], dtype), "b": jnp.array([3.0], dtype)}


def _grads(dtype=jnp.float32):
  return {"w": jnp.full(2, 0.1, dtype), "b": jnp.full(1, 0.1, dtype)}


def _ema():
  return optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5)


def _train(tx, num_steps, params=None, dtype=jnp.float32):
  params = _params(dtype) if params is None else params
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(num_steps):
    updates, state = step(_grads(dtype), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_tree_close(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], **TOL)


def test_direct_state():
  params, state = _train(_ema(), 2)
  _assert_tree_close(params, PARAMS_AFTER_TWO)
  _assert_tree_close(optax_ema.averaged_params(state), AVG_AFTER_TWO)
  _assert_tree_close(optax_ema.averaged_params(state, params), AVG_AFTER_TWO)


def test_inside_chain():
  tx = optax.chain(optax.clip_by_global_norm(10.0), _ema())
  params, state = _train(tx, 2)
  _assert_tree_close(params, PARAMS_AFTER_TWO)
  _assert_tree_close(optax_ema.averaged_params(state), AVG_AFTER_TWO)


def test_inside_nested_chain():
  tx = optax.chain(optax.identity(), optax.chain(optax.clip(10.0), _ema()))
  _, state = _train(tx, 2)
  _assert_tree_close(optax_ema.averaged_params(state), AVG_AFTER_TWO)


def test_inside_named_chain():
  tx = optax.named_chain(("clip", optax.clip(10.0)), ("ema", _ema()))
  _, state = _train(tx, 2)
  _assert_tree_close(optax_ema.averaged_params(state), AVG_AFTER_TWO)


def test_inside_inject_hyperparams_with_a_changed_decay():
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(2.0), average_decay=0.5
  )
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates, state = step(_grads(), state, params)
  params = optax.apply_updates(params, updates)
  _assert_tree_close(optax_ema.averaged_params(state), {"w": [0.9, 1.9], "b": [2.9]})
  state.hyperparams["average_decay"] = jnp.asarray(0.9)
  updates, state = step(_grads(), state, params)
  params = optax.apply_updates(params, updates)
  # 0.9 - (0.9 - 0.6) * (1 - 0.9) = 0.87
  _assert_tree_close(optax_ema.averaged_params(state), {"w": [0.87, 1.87], "b": [2.87]})


def test_wrapping_an_injected_optimizer():
  tx = optax_ema.moving_average(optax.inject_hyperparams(optax.sgd)(2.0), 0.5)
  _, state = _train(tx, 2)
  _assert_tree_close(optax_ema.averaged_params(state), AVG_AFTER_TWO)


def test_inside_multisteps_moves_only_on_real_steps():
  tx = optax.MultiSteps(_ema(), every_k_schedule=2)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  averages = []
  for _ in range(4):
    updates, state = step(_grads(), state, params)
    params = optax.apply_updates(params, updates)
    averages.append(optax_ema.averaged_params(state, params))
  # Micro step 1 leaves everything as it was; 2 and 4 are real steps.
  _assert_tree_close(averages[0], {"w": [1.0, 2.0], "b": [3.0]})
  _assert_tree_close(averages[1], {"w": [0.9, 1.9], "b": [2.9]})
  _assert_tree_close(averages[2], {"w": [0.9, 1.9], "b": [2.9]})
  _assert_tree_close(averages[3], AVG_AFTER_TWO)
  _assert_tree_close(params, PARAMS_AFTER_TWO)


def test_inside_masked():
  tx = optax.masked(_ema(), {"w": True, "b": False})
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(2):
    updates, state = step(_grads(), state, params)
    params = optax.apply_updates(params, updates)
  # optax.masked passes the raw gradients through for "b": 3 + 0.1 + 0.1.
  np.testing.assert_allclose(params["b"], [3.2], **TOL)
  out = optax_ema.averaged_params(state, params)
  np.testing.assert_allclose(out["w"], AVG_AFTER_TWO["w"], **TOL)
  np.testing.assert_array_equal(out["b"], params["b"])
  with pytest.raises(ValueError, match="params"):
    optax_ema.averaged_params(state)


def test_inside_a_dict_holding_the_state():
  params, state = _train(_ema(), 2)
  holder = {"step": 2, "params": params, "opt_state": (state, None)}
  _assert_tree_close(optax_ema.averaged_params(holder), AVG_AFTER_TWO)


def test_inside_a_flax_train_state():
  ts = flax.training.train_state.TrainState.create(
    apply_fn=None, params=_params(), tx=optax.chain(optax.clip(10.0), _ema())
  )
  for _ in range(2):
    ts = ts.apply_gradients(grads=_grads())
  _assert_tree_close(ts.params, PARAMS_AFTER_TWO)
  _assert_tree_close(optax_ema.averaged_params(ts), AVG_AFTER_TWO)
  _assert_tree_close(optax_ema.averaged_params(ts, ts.params), AVG_AFTER_TWO)


def test_under_jit():
  params, state = _train(_ema(), 2)
  out = jax.jit(optax_ema.averaged_params)(state, params)
  _assert_tree_close(out, AVG_AFTER_TWO)


def test_two_states_is_an_error_listing_both():
  tx = optax.chain(_ema(), optax_ema.moving_average(optax.identity(), 0.9))
  _, state = _train(tx, 1)
  with pytest.raises(ValueError, match="2") as excinfo:
    optax_ema.averaged_params(state)
  message = str(excinfo.value)
  assert "[0]" in message
  assert "[1]" in message
  assert "MovingAverageState" in message


def test_two_states_in_a_dict_is_an_error_listing_both():
  _, state = _train(_ema(), 1)
  with pytest.raises(ValueError) as excinfo:
    optax_ema.averaged_params({"student": state, "teacher": state})
  assert "['student']" in str(excinfo.value)
  assert "['teacher']" in str(excinfo.value)


@pytest.mark.parametrize(
  "opt_state",
  [optax.adam(1e-3).init(_params()), (), None, {"params": _params()}],
  ids=["adam", "empty", "None", "dict"],
)
def test_no_state_is_an_error(opt_state):
  with pytest.raises(ValueError, match=r"(?i)\bno\b.*state"):
    optax_ema.averaged_params(opt_state)


def test_bfloat16_params_come_back_in_their_dtype():
  # Gradients of 1/8 make the bfloat16 SGD steps exact: 1 -> 0.75 -> 0.5.
  tx = _ema()
  params = _params(jnp.bfloat16)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.125), params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  raw = optax_ema.averaged_params(state)
  assert raw["w"].dtype == jnp.float32  # the accumulator
  out = optax_ema.averaged_params(state, params)
  assert out["w"].dtype == jnp.bfloat16
  assert out["b"].dtype == jnp.bfloat16
  # 1 - (1 - 0.75) * 0.5 = 0.875; 0.875 - (0.875 - 0.5) * 0.5 = 0.6875.
  want = {"w": [0.6875, 1.6875], "b": [2.6875]}
  _assert_tree_close(raw, want)
  _assert_tree_close(jax.tree.map(lambda x: x.astype(jnp.float32), out), want)


def test_masked_and_non_float_leaves_come_from_params():
  params = {
    "w": jnp.array([1.0, 2.0]),
    "frozen": jnp.array([5.0]),
    "step": jnp.array(3, jnp.int32),
  }
  tx = optax_ema.moving_average(
    optax.identity(), 0.5, mask={"w": True, "frozen": False, "step": True}
  )
  state = tx.init(params)
  updates = {
    "w": jnp.array([-0.2, -0.2]),
    "frozen": jnp.array([1.0]),
    "step": jnp.array(1, jnp.int32),
  }
  _, state = tx.update(updates, state, params)
  params = optax.apply_updates(params, updates)
  out = optax_ema.averaged_params(state, params)
  np.testing.assert_allclose(out["w"], [0.9, 1.9], **TOL)
  np.testing.assert_array_equal(out["frozen"], [6.0])
  assert out["step"].dtype == jnp.int32
  assert int(out["step"]) == 4


def test_params_of_another_structure_is_an_error():
  params, state = _train(_ema(), 1)
  with pytest.raises(ValueError, match="params") as excinfo:
    optax_ema.averaged_params(state, {"w": params["w"], "c": params["b"]})
  assert "['b']" in str(excinfo.value) or "['c']" in str(excinfo.value)
  with pytest.raises(ValueError, match="params") as excinfo:
    optax_ema.averaged_params(state, {"w": params["w"], "b": jnp.ones(3)})
  assert "['b']" in str(excinfo.value)


def test_which_is_rejected_for_a_single_average():
  _, state = _train(_ema(), 1)
  with pytest.raises(ValueError, match="`which`"):
    optax_ema.averaged_params(state, which=0)


def _ma():
  return optax_ema.moving_average(optax.sgd(0.1), 0.9)


P2 = {"w": jnp.ones(2)}
NOT_LAST = {
  "chain then scale": lambda: optax.chain(_ma(), optax.scale(0.5)),
  "named_chain then scale": lambda: optax.named_chain(
    ("ema", _ma()), ("scale", optax.scale(0.5))
  ),
  "inside inject_hyperparams": lambda: optax.inject_hyperparams(
    lambda lr: optax.chain(_ma(), optax.scale(lr))
  )(lr=0.5),
  "inside MultiSteps": lambda: optax.MultiSteps(
    optax.chain(_ma(), optax.scale_by_adam()), 2
  ),
  "power_ema then scale": lambda: optax.chain(
    optax_ema.power_ema(optax.sgd(0.1), (0.1,)), optax.scale(0.5)
  ),
}


@pytest.mark.parametrize("name", list(NOT_LAST))
@pytest.mark.parametrize("reader", ["averaged_params", "diagnostics"])
def test_an_average_not_last_in_its_chain_warns_when_read(name, reader):
  state = NOT_LAST[name]().init(P2)
  read = {
    "averaged_params": lambda: optax_ema.averaged_params(state),
    "diagnostics": lambda: optax_ema.diagnostics(state, P2),
  }[reader]
  with pytest.warns(UserWarning, match="not last in its optax.chain") as record:
    read()
  assert f"`{reader}`" in str(record[0].message)
  assert record[0].filename == __file__


def test_the_average_not_last_in_its_chain_is_of_params_that_never_exist():
  # What the warning is about: with optax.scale(0.5) after it, the average
  # follows p - 0.1 g while the params move by half of that.
  tx = optax.chain(optax_ema.moving_average(optax.sgd(0.1), 0.0), optax.scale(0.5))
  params = {"w": jnp.ones(2)}
  updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  with pytest.warns(UserWarning, match="not last"):
    average = optax_ema.averaged_params(state)
  np.testing.assert_allclose(np.asarray(params["w"]), [0.95, 0.95])
  np.testing.assert_allclose(np.asarray(average["w"]), [0.9, 0.9])


LAST_OR_NOT_A_CHAIN = {
  "one-element chain": lambda: optax.chain(_ma()).init(P2),
  "last in a chain": lambda: optax.chain(optax.clip(1.0), _ma()).init(P2),
  "a user's tuple with a step count": lambda: (_ma().init(P2), jnp.int32(3)),
  "a user's tuple with a second optimizer": lambda: (
    _ma().init(P2),
    optax.adam(0.1).init(P2),
  ),
  "a user's dict": lambda: {"ema": _ma().init(P2), "d": optax.sgd(0.1).init(P2)},
  "one partition of optax.multi_transform": lambda: optax.multi_transform(
    {"ema": _ma(), "plain": optax.sgd(0.1)}, {"w": "ema"}
  ).init(P2),
}


@pytest.mark.parametrize("name", list(LAST_OR_NOT_A_CHAIN))
def test_an_average_last_in_its_chain_or_in_a_users_tuple_raises_no_alarm(name):
  state = LAST_OR_NOT_A_CHAIN[name]()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax_ema.averaged_params(state)
    optax_ema.diagnostics(state, P2)


def test_averaged_params_takes_non_array_leaves_where_the_state_holds_none():
  model = {"w": jnp.array([1.0, 3.0]), "act": jnp.tanh, "rate": 0.5, "n": np.int32(2)}
  filtered = {"w": model["w"], "act": None, "rate": None, "n": None}
  tx = optax_ema.moving_average(optax.sgd(1.0), average_decay=0.5)
  state = tx.init(filtered)
  _, state = tx.update(
    {"w": jnp.array([1.0, 1.0]), "act": None, "rate": None, "n": None}, state, filtered
  )
  moved = {**model, "w": jnp.array([0.0, 2.0])}
  got = optax_ema.averaged_params(state, moved)
  np.testing.assert_allclose(got["w"], [0.5, 2.5])  # 0.5 * w0 + 0.5 * w1
  assert got["act"] is jnp.tanh and got["rate"] == 0.5 and got["n"] == 2
  float_there = {**moved, "rate": jnp.array(0.5)}
  with pytest.raises(
    ValueError, match=r"\['rate'\] is None in the state but a floating"
  ):
    optax_ema.averaged_params(state, float_there)
