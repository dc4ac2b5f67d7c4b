"""Every bad input: the exception type, and a message naming the argument.

Errors are raised at construction (``moving_average(...)``) or at trace time
(``update``), never from inside a tree map.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema


def _sgd():
  return optax.sgd(0.1)


def _assert_not_from_a_tree_map(excinfo):
  """The error is raised by the package's own checks, not a jax tree map."""
  frames = [str(entry.path) for entry in excinfo.traceback]
  jax_tree = ("jax/_src/tree_util.py", "jax/_src/tree.py")
  assert not any(f.endswith(jax_tree) for f in frames), frames


# ------------------------------------------------------------------ optimizer


@pytest.mark.parametrize(
  "optimizer",
  [None, 0.1, object(), lambda g: g, {"init": 1, "update": 2}, (1, 2)],
  ids=["None", "float", "object", "function", "dict", "tuple"],
)
def test_optimizer_not_a_transformation_is_type_error(optimizer):
  with pytest.raises(TypeError, match="`optimizer`"):
    optax_ema.moving_average(optimizer)


def test_optimizer_none_with_decay_is_type_error():
  with pytest.raises(TypeError, match="`optimizer`"):
    optax_ema.moving_average(None, 0.9)


# -------------------------------------------------------------- average_decay


@pytest.mark.parametrize(
  "decay",
  [-0.1, 1.1, 2, -1, math.nan, math.inf, -math.inf, np.float32(1.5), np.nan],
  ids=["-0.1", "1.1", "2", "-1", "nan", "inf", "-inf", "np.float32(1.5)", "np.nan"],
)
def test_average_decay_out_of_range_is_value_error(decay):
  with pytest.raises(ValueError, match="`average_decay`") as excinfo:
    optax_ema.moving_average(_sgd(), decay)
  assert repr(decay) in str(excinfo.value) or str(decay) in str(excinfo.value)


@pytest.mark.parametrize("decay", [True, False, np.bool_(True)], ids=str)
def test_average_decay_bool_is_rejected(decay):
  # Old code passed `sequential_update` positionally in this place.
  with pytest.raises((TypeError, ValueError), match="`average_decay`"):
    optax_ema.moving_average(_sgd(), decay)


def test_old_positional_sequential_update_is_rejected():
  with pytest.raises((TypeError, ValueError), match="`average_decay`"):
    optax_ema.moving_average(_sgd(), False)  # meant sequential_update=False


# (A tuple/list or dict of decays keeps several averages: a later feature.)
@pytest.mark.parametrize(
  "decay", ["0.9", None, object()], ids=["str", "None", "object"]
)
def test_average_decay_of_another_type_is_rejected(decay):
  with pytest.raises((TypeError, ValueError), match="`average_decay`"):
    optax_ema.moving_average(_sgd(), decay)


@pytest.mark.parametrize("decay", [0.0, 1.0, 0, 1, np.float32(0.5)], ids=str)
def test_average_decay_bounds_are_accepted(decay):
  tx = optax_ema.moving_average(_sgd(), decay)
  params = {"w": jnp.ones(2)}
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  # 1 - (1 - 0.9) * (1 - d)
  want = 1.0 - 0.1 * (1.0 - float(np.float32(decay)))
  np.testing.assert_allclose(state.average["w"], [want, want], rtol=1e-6)


# ---------------------------------------------------------------- num_updates


@pytest.mark.parametrize(
  ("num_updates", "error"),
  [
    (1.5, TypeError),
    (2.0, TypeError),
    ("3", TypeError),
    (True, TypeError),
    (False, TypeError),
    (-1, ValueError),
  ],
  ids=["1.5", "2.0", "str", "True", "False", "-1"],
)
def test_bad_num_updates(num_updates, error):
  with pytest.raises(error, match="`num_updates`") as excinfo:
    optax_ema.moving_average(_sgd(), 0.9, num_updates=num_updates)
  assert repr(num_updates) in str(excinfo.value)


# ----------------------------------------------------------------- start_step


@pytest.mark.parametrize(
  ("start_step", "error"),
  [
    (-1, ValueError),
    (1.5, TypeError),
    (2.0, TypeError),
    ("2", TypeError),
    (None, TypeError),
    (True, TypeError),
  ],
  ids=["-1", "1.5", "2.0", "str", "None", "True"],
)
def test_bad_start_step(start_step, error):
  with pytest.raises(error, match="`start_step`") as excinfo:
    optax_ema.moving_average(_sgd(), 0.9, start_step=start_step)
  assert repr(start_step) in str(excinfo.value)


def test_numpy_int_start_step_and_num_updates_are_accepted():
  tx = optax_ema.moving_average(
    _sgd(), 0.5, start_step=np.int64(1), num_updates=np.int32(1)
  )
  params = {"w": jnp.ones(2)}
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  np.testing.assert_allclose(state.average["w"], [0.9, 0.9], rtol=1e-6)


# ------------------------------------------------------------------- ema_dtype


@pytest.mark.parametrize("ema_dtype", [jnp.int32, jnp.bool_, "not a dtype"], ids=str)
def test_non_float_ema_dtype_is_rejected(ema_dtype):
  with pytest.raises((TypeError, ValueError), match="`ema_dtype`"):
    optax_ema.moving_average(_sgd(), ema_dtype=ema_dtype)


# ---------------------------------------------------------------- params=None


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_update_without_params_is_value_error(jit):
  tx = optax_ema.moving_average(_sgd(), 0.9)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match="params"):
    update({"w": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match="params"):
    update({"w": jnp.ones(2)}, state, None)


# ------------------------------------------------- params of another structure


def _state_for(params):
  tx = optax_ema.moving_average(_sgd(), 0.9)
  return tx, tx.init(params)


@pytest.mark.parametrize(
  ("params", "path"),
  [
    ({"a": jnp.ones(2), "c": jnp.ones((2, 3))}, "['b']"),  # renamed key
    ({"a": jnp.ones(2)}, "['b']"),  # missing key
    ({"a": jnp.ones(2), "b": jnp.ones((3, 2))}, "['b']"),  # other shape
    ({"a": jnp.ones(3), "b": jnp.ones((2, 3))}, "['a']"),  # other shape
    ({"a": jnp.ones(2), "b": jnp.ones(6)}, "['b']"),  # other rank
  ],
  ids=["renamed", "missing", "shape-b", "shape-a", "rank"],
)
def test_params_of_another_structure_is_value_error_naming_the_path(params, path):
  tx, state = _state_for({"a": jnp.ones(2), "b": jnp.ones((2, 3))})
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="params") as excinfo:
    tx.update(grads, state, params)
  assert path in str(excinfo.value)
  _assert_not_from_a_tree_map(excinfo)


def test_nested_mismatch_names_the_full_path():
  tx, state = _state_for({"layer": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}})
  params = {"layer": {"w": jnp.ones((2, 2)), "b": jnp.ones(3)}}
  with pytest.raises(ValueError, match="params") as excinfo:
    jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  assert "['layer']['b']" in str(excinfo.value)
  _assert_not_from_a_tree_map(excinfo)


def test_list_params_of_another_length_is_value_error():
  tx, state = _state_for([jnp.ones(2), jnp.ones(3)])
  params = [jnp.ones(2), jnp.ones(3), jnp.ones(4)]
  with pytest.raises(ValueError, match="params") as excinfo:
    tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert "[2]" in str(excinfo.value)
  _assert_not_from_a_tree_map(excinfo)
