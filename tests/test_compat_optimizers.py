"""Optimizers by name and Keras keyword arguments.

Expected values come from NumPy written from the update rules (SGD, Adam,
RMSprop, Keras's clipping and inverse-time decay), not from the code under
test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

import helpers

# Keras's documented default learning rates (tf.keras 2.x / Keras 3).
KERAS_DEFAULTS = {
  "sgd": 0.01,
  "adam": 0.001,
  "adamw": 0.001,
  "rmsprop": 0.001,
  "adagrad": 0.001,
  "adadelta": 0.001,
  "adamax": 0.001,
  "nadam": 0.001,
  "lion": 0.001,
  "lamb": 0.001,
}


def _run(tx, grads_list, params):
  """(the updates of each step, the final state)."""
  _, state, updates = helpers.run_recording(
    tx, params, grads_list, lambda params, state, updates: updates
  )
  return updates, state


def _hyperparams(state):
  """The inject_hyperparams dict inside a state (found by field, not by path)."""
  found = []

  def walk(x):
    if isinstance(x, tuple) and "hyperparams" in getattr(x, "_fields", ()):
      found.append(x.hyperparams)
    elif isinstance(x, (tuple, list)):
      for y in x:
        walk(y)

  walk(state)
  assert len(found) == 1
  return found[0]


def test_name_builds_adam_with_learning_rate_in_state():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  g = np.array([0.5, -0.1, 2.0], np.float32)
  tx = optax_ema.moving_average("adam", learning_rate=0.01)
  (updates,), state = _run(tx, [{"w": jnp.asarray(g)}], params)
  assert float(_hyperparams(state)["learning_rate"]) == pytest.approx(0.01)
  b1, b2, eps = 0.9, 0.999, 1e-8
  m_hat = (1 - b1) * g / (1 - b1)
  v_hat = (1 - b2) * g**2 / (1 - b2)
  expected = -0.01 * m_hat / (np.sqrt(v_hat) + eps)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(KERAS_DEFAULTS))
def test_keras_default_learning_rate(name):
  tx = optax_ema.moving_average(name)
  state = tx.init({"w": jnp.ones(3)})
  assert float(_hyperparams(state)["learning_rate"]) == pytest.approx(
    KERAS_DEFAULTS[name]
  )


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Nadam"])
def test_keras_class_names_are_accepted(name):
  tx = optax_ema.moving_average(name)
  state = tx.init({"w": jnp.ones(2)})
  assert float(_hyperparams(state)["learning_rate"]) == pytest.approx(
    KERAS_DEFAULTS[name.lower()]
  )


def test_learning_rate_changed_in_state_changes_next_step():
  params = {"w": jnp.array([1.0, 2.0])}
  tx = optax_ema.moving_average("sgd", learning_rate=0.5)
  state = tx.init(params)
  grads = {"w": jnp.array([1.0, -1.0])}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], [-0.5, 0.5])
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.25)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], [-0.25, 0.25])


@pytest.mark.parametrize(
  "name", ["yogi", "novograd", "radam", "lars", "sign_sgd", "adafactor"]
)
def test_any_optax_alias_by_name_matches_the_alias(name):
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
  grads = [
    {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.2)},
    {"w": jnp.array([-0.1, 0.4, 0.2]), "b": jnp.array(-0.3)},
  ]
  ours, _ = _run(optax_ema.moving_average(name, learning_rate=0.1), grads, params)
  theirs, _ = _run(getattr(optax, name)(0.1), grads, params)
  for a, b in zip(ours, theirs, strict=True):
    # Injected hyperparameters are float32 arrays rather than Python floats.
    np.testing.assert_allclose(a["w"], b["w"], rtol=2e-5)
    np.testing.assert_allclose(a["b"], b["b"], rtol=2e-5)


def test_unknown_name_is_value_error_with_close_matches():
  with pytest.raises(ValueError, match=r"'adma'.*Did you mean.*'adam'"):
    optax_ema.moving_average("adma")
  with pytest.raises(ValueError, match=r"Known names: .*sgd"):
    optax_ema.swa("zzzz")


def test_unknown_keyword_is_type_error_naming_it():
  with pytest.raises(TypeError, match=r"bogus.*optax\.sgd.*momentum"):
    optax_ema.moving_average("sgd", bogus=1.0)
  with pytest.raises(TypeError, match="bogus"):
    optax_ema.moving_average(optax.sgd(0.1), bogus=1.0)


def test_lr_is_deprecated_alias_of_learning_rate():
  # The DeprecationWarning is the behaviour under test.
  with pytest.warns(DeprecationWarning, match="`lr` is deprecated"):
    tx = optax_ema.moving_average("sgd", lr=0.3)
  state = tx.init({"w": jnp.ones(2)})
  assert float(_hyperparams(state)["learning_rate"]) == pytest.approx(0.3)


def test_lr_and_learning_rate_together_is_an_error():
  with pytest.raises(TypeError, match="both `lr` and `learning_rate`"):
    optax_ema.moving_average("sgd", lr=0.3, learning_rate=0.1)


def test_decay_is_keras_inverse_time_decay():
  lr, decay = 0.5, 0.1
  params = {"w": jnp.array([1.0, 2.0])}
  grads = [{"w": jnp.array([1.0, -2.0])}] * 4
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):
    tx = optax_ema.moving_average("sgd", learning_rate=lr, decay=decay)
  updates, state = _run(tx, grads, params)
  for t, u in enumerate(updates):
    np.testing.assert_allclose(u["w"], -lr / (1 + decay * t) * np.array([1.0, -2.0]))
  # The base rate and the decay both live in the state.
  hp = _hyperparams(state)
  assert float(hp["learning_rate"]) == pytest.approx(lr)
  assert float(hp["lr_decay"]) == pytest.approx(decay)


def test_rmsprop_rho_and_decay_are_keras_arguments():
  lr, rho, decay, eps = 0.1, 0.8, 0.5, 1e-8
  g = np.array([0.5, -1.5], np.float32)
  params = {"w": jnp.array([1.0, 2.0])}
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):
    tx = optax_ema.moving_average("rmsprop", learning_rate=lr, rho=rho, decay=decay)
  updates, _ = _run(tx, [{"w": jnp.asarray(g)}] * 3, params)
  nu = np.zeros(2)
  for t, u in enumerate(updates):
    nu = rho * nu + (1 - rho) * g**2
    expected = -lr / (1 + decay * t) * g / np.sqrt(nu + eps)
    np.testing.assert_allclose(u["w"], expected, rtol=1e-5)


def test_keras_spellings_of_adam_arguments():
  g = np.array([0.5, -0.1], np.float32)
  tx = optax_ema.moving_average("adam", learning_rate=0.1, beta_1=0.5, epsilon=0.1)
  updates, _ = _run(tx, [{"w": jnp.asarray(g)}] * 2, {"w": jnp.zeros(2)})
  m = v = np.zeros(2)
  for t, u in enumerate(updates, start=1):
    m = 0.5 * m + 0.5 * g
    v = 0.999 * v + 0.001 * g**2
    expected = -0.1 * (m / (1 - 0.5**t)) / (np.sqrt(v / (1 - 0.999**t)) + 0.1)
    np.testing.assert_allclose(u["w"], expected, rtol=1e-5)


def test_keras_and_optax_spelling_together_is_an_error():
  with pytest.raises(TypeError, match="both `beta_1` and `b1`"):
    optax_ema.moving_average("adam", beta_1=0.5, b1=0.5)


def test_learning_rate_schedule_by_name():
  schedule = optax.linear_schedule(1.0, 0.0, 4)
  grads = [{"w": jnp.array([1.0])}] * 3
  updates, _ = _run(
    optax_ema.moving_average("sgd", learning_rate=schedule), grads, {"w": jnp.ones(1)}
  )
  np.testing.assert_allclose([u["w"][0] for u in updates], [-1.0, -0.75, -0.5])


def test_callable_mask_of_adamw_is_static():
  params = {"w": jnp.array([1.0, 1.0]), "b": jnp.array([1.0, 1.0])}
  zero = {"w": jnp.zeros(2), "b": jnp.zeros(2)}
  # moving_average has a `mask` of its own (which leaves to average), so the
  # alias's mask goes through swa here.
  tx = optax_ema.swa(
    "adamw", learning_rate=0.1, weight_decay=0.5, mask=lambda p: {"w": True, "b": False}
  )
  (updates,), _ = _run(tx, [zero], params)
  # Zero gradients: only the decoupled weight decay moves masked-in leaves.
  np.testing.assert_allclose(updates["w"], [-0.05, -0.05], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [0.0, 0.0])


def test_clipnorm_clips_each_leaf_to_its_own_norm():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  (updates,), _ = _run(
    optax_ema.moving_average("sgd", learning_rate=1.0, clipnorm=1.0), [grads], params
  )
  np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-0.3, -0.4], rtol=1e-6)


def test_global_clipnorm_clips_the_global_norm():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 12.0])}
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  (updates,), _ = _run(
    optax_ema.moving_average("sgd", learning_rate=1.0, global_clipnorm=1.3),
    [grads],
    params,
  )
  scale = 1.3 / 13.0
  np.testing.assert_allclose(updates["a"], -scale * np.array([3.0, 4.0]), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -scale * np.array([0.0, 12.0]), rtol=1e-6)


def test_clipvalue_then_clipnorm_in_keras_order():
  grads = {"a": jnp.array([3.0, 4.0])}
  (updates,), _ = _run(
    optax_ema.moving_average("sgd", learning_rate=1.0, clipvalue=2.0, clipnorm=1.0),
    [grads],
    {"a": jnp.zeros(2)},
  )
  # Keras clips values first: [2, 2], then its norm 2*sqrt(2) down to 1.
  np.testing.assert_allclose(updates["a"], -np.array([2.0, 2.0]) / np.sqrt(8.0))


def test_clipping_applies_to_a_built_transformation():
  (updates,), _ = _run(
    optax_ema.swa(optax.sgd(1.0), clipvalue=0.5),
    [{"a": jnp.array([3.0, -0.25])}],
    {"a": jnp.zeros(2)},
  )
  np.testing.assert_allclose(updates["a"], [-0.5, 0.25])


def test_clipnorm_with_global_clipnorm_is_an_error():
  with pytest.raises(ValueError, match="`clipnorm` and `global_clipnorm`"):
    optax_ema.moving_average("sgd", clipnorm=1.0, global_clipnorm=1.0)


@pytest.mark.parametrize("key", ["clipnorm", "clipvalue", "global_clipnorm"])
@pytest.mark.parametrize(
  ("value", "error"),
  [(0.0, ValueError), (-1.0, ValueError), ("1", TypeError), (True, TypeError)],
)
def test_bad_clip_values(key, value, error):
  with pytest.raises(error, match=f"`{key}`"):
    optax_ema.moving_average("sgd", **{key: value})


@pytest.mark.parametrize("kwargs", [{"learning_rate": 0.1}, {"decay": 0.1}])
def test_learning_rate_or_decay_on_a_built_transformation_is_an_error(kwargs):
  (key,) = kwargs
  with pytest.raises(ValueError, match=f"`{key}`.*already built"):
    optax_ema.moving_average(optax.sgd(0.1), **kwargs)


def test_lr_on_a_built_transformation_is_an_error():
  # The DeprecationWarning comes first; the error is the behaviour under test.
  with (
    pytest.warns(DeprecationWarning, match="`lr`"),
    pytest.raises(ValueError, match=r"`lr`.*already built"),
  ):
    optax_ema.moving_average(optax.sgd(0.1), lr=0.1)


def test_name_without_keras_default_needs_learning_rate():
  with pytest.raises(TypeError, match="`learning_rate` for the optimizer 'yogi'"):
    optax_ema.moving_average("yogi")


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"learning_rate": -0.1}, ValueError, "`learning_rate` must be >= 0"),
    ({"learning_rate": "fast"}, TypeError, "`learning_rate` must be a float"),
    ({"decay": -0.5}, ValueError, "`decay` must be a non-negative"),
    ({"decay": "x"}, TypeError, "`decay` must be a non-negative"),
  ],
)
def test_bad_learning_rate_and_decay(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_ema.moving_average("sgd", **kwargs)


@pytest.mark.parametrize("optimizer", [None, 3, object()])
def test_not_an_optimizer_is_type_error(optimizer):
  with pytest.raises(TypeError, match="`optimizer` must be an optax"):
    optax_ema.moving_average(optimizer)


def test_named_optimizer_runs_under_jit_without_recompiling():
  with pytest.warns(
    UserWarning, match="Keras's legacy learning-rate decay.*`average_decay`"
  ):
    tx = optax_ema.moving_average("adam", learning_rate=0.1, clipnorm=1.0, decay=0.01)
  params = {"w": jnp.ones(3)}
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1
