"""The seed's classes, MovingAverage and SWA, member by member .

Includes the upstream TFA test cases (moving_average_test.py, swa_test.py)
with their published numbers; other expected values come from NumPy written
from the averaging rules, not from the code under test.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema


def _numpy_ema(p0, grads, lr, decay, *, sequential=True, start_step=0, dynamic=False):
  """SGD parameters and TFA's moving average after each step (NumPy)."""
  p = np.array(p0, np.float64)
  average = p.copy()
  history = []
  for t, g in enumerate(grads):
    d = decay
    if dynamic:
      d = min(d, (1.0 + t - start_step) / (10.0 + t - start_step))
    if t < start_step:
      d = 0.0
    new_p = p - lr * np.asarray(g, np.float64)
    x = new_p if sequential else p
    average = average - (average - x) * (1 - d)
    p = new_p
    history.append((p.copy(), average.copy()))
  return history


def _pairs():
  return [jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])], [
    jnp.array([0.1, 0.1]),
    jnp.array([0.01, 0.01]),
  ]


# -- upstream TFA cases -------------------------------------------------------


def test_tfa_run_with_assign_average_vars():
  params, grads = _pairs()
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5, learning_rate=2.0)
  for _ in range(2):
    params = opt.apply_gradients(zip(grads, params, strict=True))
  np.testing.assert_allclose(params[0], [0.6, 1.6], rtol=1e-6)
  np.testing.assert_allclose(params[1], [2.96, 3.96], rtol=1e-6)
  np.testing.assert_allclose(opt.get_slot(params[0], "average"), [0.75, 1.75])
  np.testing.assert_allclose(opt.get_slot(params[1], "average"), [2.975, 3.975])
  averaged = opt.assign_average_vars(params)
  np.testing.assert_allclose(averaged[0], [0.75, 1.75], rtol=1e-6)
  np.testing.assert_allclose(averaged[1], [2.975, 3.975], rtol=1e-6)
  assert opt.iterations == 2


def test_run_without_sequential_update_averages_pre_update_params():
  params, grads = _pairs()
  opt = optax_ema.MovingAverage(optax.sgd(2.0), False, 0.5)
  for _ in range(2):
    params = opt.apply_gradients(zip(grads, params, strict=True))
  expected = _numpy_ema([1.0, 2.0], [[0.1, 0.1]] * 2, 2.0, 0.5, sequential=False)
  np.testing.assert_allclose(opt.get_slot(0, "average"), expected[-1][1], rtol=1e-6)


def test_tfa_optimizer_failure():
  with pytest.raises(TypeError, match="`optimizer`"):
    optax_ema.MovingAverage(None, 0.5)
  with pytest.raises(TypeError, match="`optimizer`"):
    optax_ema.SWA(None, average_period=10)


def test_tfa_model_weights_update():
  kernel = {"dense": {"kernel": jnp.array([[1.0]])}}
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5, learning_rate=2.0)
  grads = {"dense": {"kernel": jnp.array([[0.1]])}}
  kernel = opt.apply_gradients((grads, kernel))
  np.testing.assert_allclose(kernel["dense"]["kernel"], [[0.8]], rtol=1e-6)


def test_tfa_model_dynamic_lr():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5, learning_rate=1e-3)
  assert opt.lr == 1e-3
  opt.lr = 1e-4
  assert opt.lr == 1e-4
  assert opt.learning_rate == 1e-4
  params = opt.apply_gradients(([jnp.array([1.0])], [jnp.array([0.0])]))
  np.testing.assert_allclose(params[0], [-1e-4], rtol=1e-6)
  opt.learning_rate = 0.5
  params = opt.apply_gradients(([jnp.array([1.0])], params))
  np.testing.assert_allclose(params[0], [-0.5001], rtol=1e-6)


def test_tfa_optimizer_string():
  for opt in (
    optax_ema.MovingAverage("adam"),
    optax_ema.SWA("adam", average_period=10),
  ):
    assert opt.lr == pytest.approx(0.001)


def test_tfa_config_round_trip_with_sgd_nesterov_momentum_decay():
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):
    opt = optax_ema.MovingAverage(
      "sgd",
      average_decay=0.5,
      num_updates=None,
      sequential_update=False,
      learning_rate=2.0,
      nesterov=True,
      momentum=0.3,
      decay=0.1,
    )
  config = opt.get_config()
  assert config["average_decay"] == 0.5
  assert config["num_updates"] is None
  assert config["sequential_update"] is False
  assert config["optimizer"] == {
    "name": "sgd",
    "config": {"learning_rate": 2.0, "nesterov": True, "momentum": 0.3, "decay": 0.1},
  }
  as_json = json.loads(json.dumps(config))
  frozen = copy.deepcopy(as_json)
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):
    new_opt = optax_ema.MovingAverage.from_config(as_json)
  assert as_json == frozen  # from_config does not mutate its argument
  assert new_opt.get_config() == config
  # Both behave the same.
  p_old = p_new = {"w": jnp.array([1.0, -1.0])}
  for g in ([0.5, 0.2], [0.1, -0.3], [0.2, 0.2]):
    grads = {"w": jnp.array(g)}
    p_old = opt.apply_gradients((grads, p_old))
    p_new = new_opt.apply_gradients((grads, p_new))
  np.testing.assert_array_equal(p_old["w"], p_new["w"])
  np.testing.assert_array_equal(
    opt.get_slot("w", "average"), new_opt.get_slot("w", "average")
  )


def test_tfa_start_step():
  opt = optax_ema.MovingAverage(
    "sgd", average_decay=0.5, start_step=1, learning_rate=1.0
  )
  var = [jnp.array([1.0, 2.0])]
  var = opt.apply_gradients(zip([jnp.array([0.1, 0.1])], var, strict=True))
  np.testing.assert_allclose(var[0], [0.9, 1.9], rtol=1e-6)
  np.testing.assert_allclose(opt.get_slot(var[0], "average"), [0.9, 1.9], rtol=1e-6)
  var = opt.apply_gradients(zip([jnp.array([0.1, 0.1])], var, strict=True))
  np.testing.assert_allclose(var[0], [0.8, 1.8], rtol=1e-6)
  np.testing.assert_allclose(opt.get_slot(var[0], "average"), [0.85, 1.85], rtol=1e-6)


def test_tfa_dynamic_decay():
  opt = optax_ema.MovingAverage(
    "sgd", average_decay=0.5, dynamic_decay=True, learning_rate=2.0
  )
  var = [jnp.array([1.0, 2.0])]
  expected = _numpy_ema([1.0, 2.0], [[0.1, 0.1]] * 2, 2.0, 0.5, dynamic=True)
  for p_ref, avg_ref in expected:
    var = opt.apply_gradients(zip([jnp.array([0.1, 0.1])], var, strict=True))
    np.testing.assert_allclose(var[0], p_ref, rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var[0], "average"), avg_ref, rtol=1e-6)
  np.testing.assert_allclose(expected[0][1], [0.82, 1.82])  # d = min(0.5, 1/10)


def test_tfa_swa_averaging_and_config():
  opt = optax_ema.SWA(optax.sgd(1.0), 0, 1)
  params = [jnp.array([1.0, 1.0]), jnp.array([2.0, 2.0])]
  for _ in range(3):
    params = opt.apply_gradients(zip([jnp.array([0.1, 0.1])] * 2, params, strict=True))
  np.testing.assert_allclose(params[0], [0.7, 0.7], rtol=1e-6)
  np.testing.assert_allclose(params[1], [1.7, 1.7], rtol=1e-6)
  averaged = opt.assign_average_vars(params)
  np.testing.assert_allclose(averaged[0], [0.8, 0.8], rtol=1e-6)
  np.testing.assert_allclose(averaged[1], [1.8, 1.8], rtol=1e-6)
  config = optax_ema.SWA("adam", average_period=10, start_averaging=0).get_config()
  config = optax_ema.SWA.from_config(json.loads(json.dumps(config))).get_config()
  assert config["average_period"] == 10
  assert config["start_averaging"] == 0
  assert config["name"] == "SWA"


def test_fit_simple_linear_model():
  # TFA's test: 5000x3 Gaussian inputs, 1e-4 noise, a Dense(1) layer, mse,
  # MovingAverage("sgd"), 5 epochs of batches of 32 (Keras's default).
  rng = np.random.default_rng(0x2019)
  x = rng.standard_normal((5000, 3)).astype(np.float32)
  w = rng.standard_normal((3, 1)).astype(np.float32)
  y = x @ w + rng.standard_normal((5000, 1)).astype(np.float32) * 1e-4
  limit = np.sqrt(6.0 / (3 + 1))  # glorot uniform, as Keras initialises Dense
  params = {
    "kernel": jnp.asarray(rng.uniform(-limit, limit, (3, 1)), jnp.float32),
    "bias": jnp.zeros(1),
  }

  def mse(params, xb, yb):
    return jnp.mean((xb @ params["kernel"] + params["bias"] - yb) ** 2)

  grad_fn = jax.jit(jax.grad(mse))
  opt = optax_ema.MovingAverage("sgd")
  for _ in range(5):
    order = rng.permutation(5000)
    for start in range(0, 5000, 32):
      idx = order[start : start + 32]
      params = opt.apply_gradients((grad_fn(params, x[idx], y[idx]), params))
  assert opt.iterations == 5 * 157
  averaged = opt.assign_average_vars(params)
  x_test = rng.standard_normal((100, 3)).astype(np.float32)
  predicted = x_test @ np.asarray(averaged["kernel"]) + np.asarray(averaged["bias"])
  max_abs_diff = np.max(np.abs(predicted - x_test @ w))
  assert max_abs_diff < 5e-3


# -- members -------------------------------------------------------------------


def test_tx_is_the_functional_transformation():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5, learning_rate=2.0)
  params = {"w": jnp.array([1.0, 2.0])}
  state = opt.tx.init(params)
  _, state = opt.tx.update({"w": jnp.array([0.1, 0.1])}, state, params)
  np.testing.assert_allclose(optax_ema.averaged_params(state)["w"], [0.9, 1.9])
  assert isinstance(opt.tx, optax.GradientTransformationExtraArgs)
  assert opt.iterations == 0  # using tx leaves the object's state alone


def test_learning_rate_of_a_built_transformation():
  injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
  opt = optax_ema.MovingAverage(injected)
  with pytest.raises(ValueError, match="only known once the state exists"):
    opt.learning_rate
  opt.build({"w": jnp.zeros(1)})
  assert opt.learning_rate == 0.5
  opt.lr = 0.25
  params = opt.apply_gradients(({"w": jnp.array([1.0])}, {"w": jnp.zeros(1)}))
  np.testing.assert_allclose(params["w"], [-0.25])
  plain = optax_ema.MovingAverage(optax.sgd(0.5))
  plain.build({"w": jnp.zeros(1)})
  with pytest.raises(ValueError, match="holds no `learning_rate`"):
    plain.learning_rate = 0.1


def test_learning_rate_with_decay_is_the_base_rate():
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):
    opt = optax_ema.MovingAverage("sgd", learning_rate=1.0, decay=1.0)
  params = {"w": jnp.zeros(1)}
  for _ in range(2):
    params = opt.apply_gradients(({"w": jnp.array([1.0])}, params))
  np.testing.assert_allclose(params["w"], [-1.5])  # 1/(1+0) + 1/(1+1)
  assert opt.lr == 1.0


@pytest.mark.parametrize(
  ("value", "error"), [("x", TypeError), (lambda c: 0.1, TypeError), (-1.0, ValueError)]
)
def test_bad_learning_rate_assignment(value, error):
  opt = optax_ema.MovingAverage("sgd")
  with pytest.raises(error, match="`learning_rate`"):
    opt.lr = value


def test_lr_keyword_warns():
  # The DeprecationWarning is the behaviour under test.
  with pytest.warns(DeprecationWarning, match="`lr` is deprecated"):
    opt = optax_ema.MovingAverage("sgd", lr=0.3)
  assert opt.learning_rate == pytest.approx(0.3)


def test_weights_order_and_round_trip():
  opt = optax_ema.MovingAverage("adam", average_decay=0.5, learning_rate=0.1)
  assert opt.weights == []
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
  for _ in range(2):
    params = opt.apply_gradients(
      ({"a": jnp.array([0.5, -0.5]), "b": jnp.array(1.0)}, params)
    )
  weights = opt.weights
  assert opt.variables() == weights
  assert int(weights[0]) == 2  # iterations first
  np.testing.assert_array_equal(weights[1], opt.get_slot("a", "average"))
  np.testing.assert_array_equal(weights[2], opt.get_slot("b", "average"))
  saved = opt.get_weights()
  assert all(isinstance(w, np.ndarray) for w in saved)
  params = opt.apply_gradients(
    ({"a": jnp.array([1.0, 1.0]), "b": jnp.array(1.0)}, params)
  )
  assert opt.iterations == 3
  opt.set_weights(saved)
  assert opt.iterations == 2
  for w, s in zip(opt.get_weights(), saved, strict=True):
    np.testing.assert_array_equal(w, s)
  changed = list(saved)
  changed[1] = np.array([9.0, 9.0], np.float32)
  opt.set_weights(changed)
  np.testing.assert_array_equal(opt.get_slot("a", "average"), [9.0, 9.0])


def test_set_weights_errors():
  opt = optax_ema.MovingAverage("sgd")
  with pytest.raises(ValueError, match="build"):
    opt.set_weights([])
  opt.build({"w": jnp.zeros(2)})
  weights = opt.get_weights()
  with pytest.raises(ValueError, match="must hold"):
    opt.set_weights(weights[:-1])
  bad_shape = list(weights)
  bad_shape[1] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"`weights\[1\]` has shape"):
    opt.set_weights(bad_shape)
  bad_dtype = list(weights)
  bad_dtype[1] = np.zeros(2, np.int32)
  with pytest.raises(ValueError, match=r"`weights\[1\]` has dtype int32"):
    opt.set_weights(bad_dtype)


def test_apply_gradients_bad_input():
  opt = optax_ema.MovingAverage("sgd")
  with pytest.raises(ValueError, match="empty"):
    opt.apply_gradients([])
  with pytest.raises(TypeError, match="element 0"):
    opt.apply_gradients([jnp.ones(2)])
  with pytest.raises(TypeError, match="`grads_and_vars`"):
    opt.apply_gradients({"w": jnp.ones(2)})


def test_minimize_get_gradients_get_updates():
  x = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
  y = np.array([1.0, 0.5], np.float32)
  w0 = np.array([0.2, -0.3], np.float32)

  def loss(params):
    return jnp.sum((x @ params["w"] - y) ** 2)

  grad_ref = 2 * x.T @ (x @ w0 - y)
  opt = optax_ema.MovingAverage("sgd", learning_rate=0.01)
  np.testing.assert_allclose(
    opt.get_gradients(loss, {"w": jnp.asarray(w0)})["w"], grad_ref, rtol=1e-6
  )
  new = opt.minimize(loss, {"w": jnp.asarray(w0)})
  np.testing.assert_allclose(new["w"], w0 - 0.01 * grad_ref, rtol=1e-6)
  twin = optax_ema.MovingAverage("sgd", learning_rate=0.01)
  updates = twin.get_updates(loss, lambda: {"w": jnp.asarray(w0)})
  np.testing.assert_allclose(updates["w"], -0.01 * grad_ref, rtol=1e-6)
  assert twin.iterations == 1
  # grad_loss scales the gradient of the loss.
  third = optax_ema.MovingAverage("sgd", learning_rate=0.01)
  new = third.minimize(loss, {"w": jnp.asarray(w0)}, grad_loss=2.0)
  np.testing.assert_allclose(new["w"], w0 - 0.02 * grad_ref, rtol=1e-6)


def test_minimize_bad_loss():
  opt = optax_ema.MovingAverage("sgd")
  with pytest.raises(TypeError, match="takes no arguments"):
    opt.minimize(lambda: 1.0, {"w": jnp.ones(1)})
  with pytest.raises(TypeError, match="callable of the parameters"):
    opt.minimize(3.0, {"w": jnp.ones(1)})
  with pytest.raises(ValueError, match="`grad_loss` has shape"):
    opt.minimize(lambda p: jnp.sum(p["w"]), {"w": jnp.ones(1)}, grad_loss=jnp.ones(2))


def test_assign_average_vars_warns_for_leaves_without_average():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5, learning_rate=1.0)
  params = opt.apply_gradients(({"w": jnp.array([1.0])}, {"w": jnp.array([1.0])}))
  extra = jnp.array([5.0])
  with pytest.warns(UserWarning, match=r"no average.*\['other'\]"):
    out = opt.assign_average_vars({"w": params["w"], "other": extra})
  np.testing.assert_allclose(out["w"], [0.5])  # 1 - (1 - 0) * 0.5
  assert out["other"] is extra


def test_average_op_uses_the_next_steps_decay():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5, dynamic_decay=True)
  # Iterations 0: decay min(0.5, 1/10) = 0.1.
  new = opt.average_op(jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(new, [0.1, 1.9], rtol=1e-6)
  swa = optax_ema.SWA("sgd", start_averaging=0, average_period=1)
  swa.apply_gradients(([jnp.zeros(1)], [jnp.zeros(1)]))
  # Iterations 1: one snapshot so far, so (avg * 1 + var) / 2.
  np.testing.assert_allclose(swa.average_op(jnp.array([3.0]), jnp.array([1.0])), [2.0])


def test_get_slot_by_path_string_leaf_and_keras_names():
  opt = optax_ema.MovingAverage("adam", learning_rate=0.1)
  params = {"layer": {"w": jnp.array([1.0, 2.0])}}
  g = np.array([0.5, -0.5], np.float32)
  params = opt.apply_gradients(({"layer": {"w": jnp.asarray(g)}}, params))
  mu = opt.get_slot(("layer", "w"), "mu")
  np.testing.assert_allclose(mu, 0.1 * g, rtol=1e-6)
  np.testing.assert_array_equal(opt.get_slot("['layer']['w']", "mu"), mu)
  np.testing.assert_array_equal(opt.get_slot("layer/w", "m"), mu)
  np.testing.assert_allclose(
    opt.get_slot(params["layer"]["w"], "nu"), 0.001 * g**2, rtol=1e-4
  )
  assert opt.get_slot_names()[:3] == ["average", "mu", "nu"]
  with pytest.raises(KeyError, match="'velocity' is not a slot"):
    opt.get_slot("layer/w", "velocity")
  with pytest.raises(KeyError, match="not one of the parameters"):
    opt.get_slot(jnp.array([1.0, 2.0]), "mu")


def test_add_slot_and_add_weight_live_in_weights():
  opt = optax_ema.MovingAverage("sgd")
  with pytest.raises(ValueError, match="build"):
    opt.add_slot("w", "extra")
  opt.build({"w": jnp.array([1.0, 2.0])})
  n = len(opt.weights)
  step = opt.add_weight("step_scale", (), initializer=0.5)
  slot = opt.add_slot("w", "extra", initializer="ones")
  np.testing.assert_array_equal(slot, [1.0, 1.0])
  assert opt.add_slot("w", "extra") is slot
  np.testing.assert_array_equal(opt.get_slot("w", "extra"), [1.0, 1.0])
  assert "extra" in opt.get_slot_names()
  assert len(opt.weights) == n + 2
  assert opt.weights[n] is step and opt.weights[n + 1] is slot
  weights = opt.get_weights()
  weights[n + 1] = np.array([7.0, 8.0], np.float32)
  opt.set_weights(weights)
  np.testing.assert_array_equal(opt.get_slot("w", "extra"), [7.0, 8.0])
  calls = opt.add_slot(
    "w", "custom", initializer=lambda shape, dtype: jnp.full(shape, 3, dtype)
  )
  np.testing.assert_array_equal(calls, [3.0, 3.0])
  with pytest.raises(ValueError, match="already a weight"):
    opt.add_weight("step_scale", ())
  with pytest.raises(ValueError, match="`trainable`"):
    opt.add_weight("other", (2,), trainable=True)
  with pytest.raises(ValueError, match="`initializer`"):
    opt.add_weight("bad", (2,), initializer="glorot")


def test_swap_weights_is_exact():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.9, learning_rate=0.1)
  params = {"w": jnp.array([0.1, 1e8, -3.3])}
  params = opt.apply_gradients(({"w": jnp.array([1.0, 7.0, 0.3])}, params))
  average = opt.get_slot("w", "average")
  swapped = opt.swap_weights(params)
  np.testing.assert_array_equal(swapped["w"], average)
  back = opt.swap_weights(swapped)
  np.testing.assert_array_equal(back["w"], params["w"])
  np.testing.assert_array_equal(opt.get_slot("w", "average"), average)


def test_from_config_with_object_and_custom_objects():
  tx = optax.sgd(0.5)
  opt = optax_ema.SWA(tx, average_period=3, clipnorm=2.0)
  config = opt.get_config()
  assert config["optimizer"] is tx and config["clipnorm"] == 2.0
  assert optax_ema.SWA.from_config(config).get_config() == config
  named = {"name": "my_sgd", "config": {"learning_rate": 0.5}}
  rebuilt = optax_ema.MovingAverage.from_config(
    {"optimizer": named, "average_decay": 0.5}, custom_objects={"my_sgd": optax.sgd}
  )
  params = rebuilt.apply_gradients(({"w": jnp.array([1.0])}, {"w": jnp.zeros(1)}))
  np.testing.assert_allclose(params["w"], [-0.5])


def test_from_config_reads_a_keras_optimizer_entry():
  config = {
    "name": "MovingAverage",
    "average_decay": 0.5,
    "optimizer": {
      "class_name": "SGD",
      "config": {"name": "SGD", "learning_rate": 2.0, "momentum": 0.0, "decay": 0.0},
    },
  }
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):  # Keras 2 configs carry `decay`: 0.0
    opt = optax_ema.MovingAverage.from_config(config)
  assert opt.get_config()["optimizer"]["name"] == "sgd"
  assert config["optimizer"]["config"]["name"] == "SGD"  # untouched
  params = opt.apply_gradients(([jnp.array([0.1])], [jnp.array([1.0])]))
  np.testing.assert_allclose(params[0], [0.8], rtol=1e-6)


def test_from_config_unknown_key_is_type_error():
  with pytest.raises(TypeError, match="bogus"):
    optax_ema.MovingAverage.from_config({"optimizer": "sgd", "bogus": 1})
  with pytest.raises(ValueError, match="no 'optimizer'"):
    optax_ema.MovingAverage.from_config({"average_decay": 0.5})


def test_bad_constructor_arguments():
  with pytest.raises(TypeError, match="`name` must be a str"):
    optax_ema.MovingAverage("sgd", name=3)
  with pytest.raises(ValueError, match="`average_decay` must be in"):
    optax_ema.MovingAverage("sgd", average_decay=1.5)
  with pytest.raises(ValueError, match="`average_period`"):
    optax_ema.SWA("sgd", average_period=0)
  with pytest.raises(TypeError, match="bogus"):
    optax_ema.SWA("sgd", bogus=1)


def test_get_config_returns_a_new_dict():
  opt = optax_ema.MovingAverage("sgd", learning_rate=0.5, clipvalue=1.0)
  config = opt.get_config()
  config["optimizer"]["config"]["learning_rate"] = 9.0
  config["average_decay"] = 0.1
  fresh = opt.get_config()
  assert fresh["optimizer"]["config"]["learning_rate"] == 0.5
  assert fresh["average_decay"] == 0.99
  assert fresh["clipvalue"] == 1.0


def test_bfloat16_params_keep_float32_averages():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.999, learning_rate=1.0)
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  for _ in range(10):
    params = opt.apply_gradients(({"w": jnp.full(2, 2.0**-6, jnp.bfloat16)}, params))
  assert opt.get_slot("w", "average").dtype == jnp.float32
  averaged = opt.assign_average_vars(params)
  assert averaged["w"].dtype == jnp.bfloat16
  # A float32 average moves by steps of ~1e-5, below bfloat16 resolution.
  p, avg = 1.0, 1.0
  for _ in range(10):
    p -= 2.0**-6
    avg -= (avg - p) * 0.001
  np.testing.assert_allclose(opt.get_slot("w", "average"), [avg, avg], rtol=1e-6)


def test_swa_class_before_the_first_snapshot_gives_the_current_params():
  opt = optax_ema.SWA("sgd", start_averaging=5, average_period=2, learning_rate=1.0)
  params = {"w": jnp.array([1.0])}
  for _ in range(3):
    params = opt.apply_gradients(({"w": jnp.array([0.25])}, params))
  np.testing.assert_allclose(opt.assign_average_vars(params)["w"], [0.25])
