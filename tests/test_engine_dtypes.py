"""Dtypes of the average, non-float / None / masked / PRNG key leaves.

``ema_dtype=None`` keeps float32/float64 leaves in their dtype and
accumulates float16/bfloat16 leaves in float32; an explicit ``ema_dtype``
wins; state dtypes never change from step to step; non-float leaves (ints,
bools, PRNG keys) hold the latest value; ``None`` leaves stay ``None``;
masked-out leaves are ``optax.MaskedNode()`` and cost no memory.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optax_ema

BF16 = ml_dtypes.bfloat16


def _float0_like(x):
  """What ``jax.grad(..., allow_int=True)`` gives for a non-float leaf."""
  return np.zeros(np.shape(x), jax.dtypes.float0)


def _dtypes(tree):
  return jax.tree.map(
    lambda x: None if isinstance(x, optax.MaskedNode) else jnp.asarray(x).dtype,
    tree,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


# ---------------------------------------------------------------- float dtypes


def test_bfloat16_params_accumulate_in_float32_by_default():
  # Updates of -2**-6 keep the bf16 params exact: x_t = 1 - t / 64.
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  tx = optax_ema.moving_average(optax.identity(), average_decay=0.99)
  state = tx.init(params)
  assert state.average["w"].dtype == jnp.float32
  step = jax.jit(tx.update)
  updates = {"w": jnp.full(3, -(2.0**-6), jnp.bfloat16)}
  want = np.ones(3, np.float32)
  one, decay = np.float32(1.0), np.float32(0.99)
  for t in range(1, 21):
    _, state = step(updates, state, params)
    params = optax.apply_updates(params, updates)
    x = np.float32(1.0 - t / 64)
    assert params["w"][0] == x  # the trajectory is exact in bfloat16
    want = want - (want - x) * (one - decay)
    assert state.average["w"].dtype == jnp.float32
  np.testing.assert_allclose(state.average["w"], want, rtol=1e-6)
  out = optax_ema.averaged_params(state, params)["w"]
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out), want.astype(BF16))


def test_nearest_rounded_bfloat16_average_with_decay_0999_never_moves():
  # The reason for the float32 default, and for stochastic rounding of
  # bfloat16 storage: 1 - 0.5 * 0.001 rounds back to 1 in bfloat16 (its
  # spacing below 1 is 2**-8), every step.
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  updates = {"w": jnp.full(2, -0.5, jnp.bfloat16)}
  half = {"w": jnp.full(2, 0.5, jnp.bfloat16)}
  zero = {"w": jnp.zeros(2, jnp.bfloat16)}
  results = {}
  for ema_dtype in (None, jnp.bfloat16):
    if ema_dtype is None:
      tx = optax_ema.moving_average(optax.identity(), 0.999)
    else:
      with pytest.warns(UserWarning, match="`stochastic_rounding=False`"):
        tx = optax_ema.moving_average(
          optax.identity(), 0.999, ema_dtype=ema_dtype, stochastic_rounding=False
        )
    state = tx.init(params)
    _, state = tx.update(updates, state, params)
    for _ in range(9):
      _, state = tx.update(zero, state, half)
    results[ema_dtype] = state.average["w"]
  # NumPy restatements: ten steps towards 0.5 from 1.
  ref_bf16 = np.ones(2, BF16)
  ref_f32 = np.ones(2, np.float32)
  d = np.float32(0.999)
  for _ in range(10):
    ref_bf16 = (
      ref_bf16.astype(np.float32) - (ref_bf16.astype(np.float32) - 0.5) * (1 - d)
    ).astype(BF16)
    ref_f32 = ref_f32 - (ref_f32 - np.float32(0.5)) * (1 - d)
  assert results[jnp.bfloat16].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(results[jnp.bfloat16]), ref_bf16)
  np.testing.assert_array_equal(ref_bf16, np.ones(2, BF16))
  assert results[None].dtype == jnp.float32
  np.testing.assert_allclose(results[None], ref_f32, rtol=1e-6)
  assert float(results[None][0]) < 0.996


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bfloat16_average_sees_params_rounded_as_apply_updates_rounds_them(jit):
  # The average takes `params + updates` "as optax.apply_updates
  # forms them", i.e. rounded to bfloat16. 1 - 2 * bf16(0.1) = 0.7998046875
  # is a tie in bfloat16 that rounds to 0.80078125.
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  grads = {"w": jnp.full(2, 0.1, jnp.bfloat16)}
  tx = optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  want = np.float32(1.0)
  for _ in range(2):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    x = np.asarray(params["w"][0]).astype(np.float32)  # what training holds
    want = want - (want - x) * np.float32(0.5)
  assert float(params["w"][0]) == 0.6015625
  np.testing.assert_allclose(state.average["w"], [want, want], rtol=1e-7)


@pytest.mark.parametrize(
  ("param_dtype", "want"),
  [
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
    (jnp.float32, jnp.float32),
  ],
)
def test_default_ema_dtype(param_dtype, want):
  tx = optax_ema.moving_average(optax.sgd(0.1))
  state = tx.init({"w": jnp.ones(2, param_dtype)})
  assert state.average["w"].dtype == want


def test_default_ema_dtype_keeps_float64_under_x64():
  with jax.enable_x64(True):
    tx = optax_ema.moving_average(optax.sgd(0.1))
    params = {"w": jnp.ones(2, jnp.float64)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(2, jnp.float64)}, state, params)
    assert state.average["w"].dtype == jnp.float64


@pytest.mark.parametrize(
  ("param_dtype", "ema_dtype"),
  [
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float16),
    (jnp.float16, jnp.float32),
    (jnp.float32, jnp.bfloat16),
    (jnp.float32, jnp.float16),
  ],
)
def test_explicit_ema_dtype_wins(param_dtype, ema_dtype):
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, ema_dtype=ema_dtype)
  params = {"w": jnp.ones(2, param_dtype), "v": jnp.ones((), param_dtype)}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert _dtypes(state.average) == {"w": ema_dtype, "v": ema_dtype}
  # One step from 1 towards 0.9 with decay 0.9 lands at 0.99 (within the
  # accumulator's precision), and reads back in the params' dtype.
  np.testing.assert_allclose(
    np.asarray(state.average["w"], np.float32), 0.99, rtol=1e-2
  )
  out = optax_ema.averaged_params(state, params)
  assert _dtypes(out) == {"w": param_dtype, "v": param_dtype}


def test_explicit_float32_ema_dtype_for_float64_params_under_x64():
  with jax.enable_x64(True):
    tx = optax_ema.moving_average(optax.sgd(0.1), ema_dtype=jnp.float32)
    params = {"w": jnp.ones(2, jnp.float64)}
    state = tx.init(params)
    assert state.average["w"].dtype == jnp.float32
    assert optax_ema.averaged_params(state, params)["w"].dtype == jnp.float64


def test_state_dtypes_stable_across_steps():
  params = {
    "f32": jnp.ones((2, 3)),
    "bf16": jnp.ones(3, jnp.bfloat16),
    "f16": jnp.ones((), jnp.float16),
    "i32": jnp.arange(3, dtype=jnp.int32),
    "u8": jnp.ones(2, jnp.uint8),
    "bool": jnp.array([True, False]),
  }
  tx = optax_ema.moving_average(
    optax.identity(), 0.9, num_updates=3, dynamic_decay=True
  )
  state = tx.init(params)
  init_dtypes = _dtypes(state)
  assert _dtypes(state.average) == {
    "f32": jnp.float32,
    "bf16": jnp.float32,
    "f16": jnp.float32,
    "i32": jnp.int32,
    "u8": jnp.uint8,
    "bool": jnp.bool_,
  }
  updates = jax.tree.map(
    lambda p: (
      jnp.ones_like(p) if jnp.issubdtype(p.dtype, jnp.inexact) else _float0_like(p)
    ),
    params,
  )
  step = jax.jit(tx.update)
  for _ in range(3):
    _, state = step(updates, state, params)
    params = {**params, "bf16": params["bf16"] + 1, "i32": params["i32"] + 1}
    assert _dtypes(state) == init_dtypes


# ------------------------------------------------------------ non-float leaves


@pytest.mark.parametrize("sequential_update", [True, False])
def test_int_and_bool_leaves_hold_the_latest_value(sequential_update):
  params = {
    "w": jnp.ones(2),
    "step": jnp.array([5, 7], jnp.int32),
    "flag": jnp.array([True, False]),
  }
  updates = {
    "w": jnp.full(2, -0.5),
    "step": jnp.array([1, 2], jnp.int32),
    "flag": _float0_like(params["flag"]),
  }
  tx = optax_ema.moving_average(
    optax.identity(), 0.5, sequential_update=sequential_update
  )
  state = tx.init(params)
  _, state = jax.jit(tx.update)(updates, state, params)
  avg = state.average
  assert avg["step"].dtype == jnp.int32
  assert avg["flag"].dtype == jnp.bool_
  # Post-update params with sequential_update, pre-update ones otherwise.
  want_step = [6, 9] if sequential_update else [5, 7]
  np.testing.assert_array_equal(avg["step"], want_step)
  np.testing.assert_array_equal(avg["flag"], [True, False])
  want_w = 0.75 if sequential_update else 1.0
  np.testing.assert_allclose(avg["w"], [want_w, want_w], rtol=1e-7)


def test_int_leaf_follows_params_not_an_average():
  # Three steps of +10: an average would lag; the state holds the value.
  params = {"n": jnp.array(0, jnp.int32), "w": jnp.zeros(())}
  updates = {"n": jnp.array(10, jnp.int32), "w": jnp.zeros(())}
  tx = optax_ema.moving_average(optax.identity(), 0.9)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(updates, state, params)
    params = optax.apply_updates(params, updates)
  assert int(state.average["n"]) == 30


@pytest.mark.parametrize("sequential_update", [True, False])
def test_prng_key_leaves_hold_the_latest_key(sequential_update):
  key = jax.random.key(0)
  params = {"w": jnp.ones(2), "key": key}
  tx = optax_ema.moving_average(
    optax.identity(), 0.5, sequential_update=sequential_update
  )
  state = tx.init(params)
  assert jax.dtypes.issubdtype(state.average["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
    jax.random.key_data(state.average["key"]), jax.random.key_data(key)
  )
  # The training loop replaces the key between steps (as with dropout).
  step = jax.jit(tx.update)
  updates = {"w": jnp.zeros(2), "key": _float0_like(key)}
  for _ in range(2):
    params = {"w": params["w"], "key": jax.random.split(params["key"])[0]}
    _, state = step(updates, state, params)
  got = state.average["key"]
  assert got.dtype == key.dtype
  np.testing.assert_array_equal(
    jax.random.key_data(got), jax.random.key_data(params["key"])
  )
  out = optax_ema.averaged_params(state, params)
  assert out["key"].dtype == key.dtype


def test_raw_uint32_key_leaf_is_not_averaged():
  key = jax.random.PRNGKey(3)  # a uint32[2] array
  params = {"w": jnp.ones(2), "key": key}
  tx = optax_ema.moving_average(optax.identity(), 0.5)
  state = tx.init(params)
  new_key = jax.random.split(key)[0]
  _, state = tx.update(
    {"w": jnp.zeros(2), "key": _float0_like(key)},
    state,
    {"w": params["w"], "key": new_key},
  )
  assert state.average["key"].dtype == jnp.uint32
  np.testing.assert_array_equal(state.average["key"], new_key)


def test_none_leaves_stay_none():
  params = {"w": jnp.ones(2), "frozen": None, "nested": [None, jnp.zeros(())]}
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.5)
  state = tx.init(params)
  assert state.average["frozen"] is None
  assert state.average["nested"][0] is None
  grads = {"w": jnp.ones(2), "frozen": None, "nested": [None, jnp.ones(())]}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["frozen"] is None
  assert state.average["frozen"] is None
  assert state.average["nested"][0] is None
  # 1 - (1 - 0) * 0.5 and 0 - (0 - (-1)) * 0.5.
  np.testing.assert_allclose(state.average["w"], [0.5, 0.5], rtol=1e-7)
  np.testing.assert_allclose(state.average["nested"][1], -0.5, rtol=1e-7)
  out = optax_ema.averaged_params(state, params)
  assert out["frozen"] is None
  assert out["nested"][0] is None


# ---------------------------------------------------------------- masked leaves


def _masked_params():
  return {
    "encoder": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
    "head": {"w": jnp.full((2,), 2.0), "b": jnp.full((), 3.0)},
  }


def _vectors_outside_encoder(params):
  """A callable mask: vector leaves, except in the encoder."""
  flags = jax.tree.map(lambda x: x.ndim == 1, params)
  return {**flags, "encoder": False}


MASKS = {
  "full_tree": {
    "encoder": {"w": False, "b": False},
    "head": {"w": True, "b": False},
  },
  "prefix": {"encoder": False, "head": {"w": True, "b": False}},
  "callable": _vectors_outside_encoder,
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_masked_leaves_are_masked_nodes(mask_kind):
  params = _masked_params()
  tx = optax_ema.moving_average(optax.sgd(1.0), 0.5, mask=MASKS[mask_kind])
  state = tx.init(params)
  avg = state.average
  for leaf in (avg["encoder"]["w"], avg["encoder"]["b"], avg["head"]["b"]):
    assert isinstance(leaf, optax.MaskedNode)
  # Masked-out leaves cost no memory: only head/w holds an array.
  assert len(jax.tree.leaves(avg)) == 1
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert isinstance(state.average["encoder"]["w"], optax.MaskedNode)
  assert isinstance(state.average["head"]["b"], optax.MaskedNode)
  # head/w: 2 - (2 - 1) * 0.5.
  np.testing.assert_allclose(state.average["head"]["w"], [1.5, 1.5], rtol=1e-7)
  new_params = optax.apply_updates(params, grads)  # any params of that shape
  out = optax_ema.averaged_params(state, new_params)
  np.testing.assert_array_equal(out["encoder"]["w"], new_params["encoder"]["w"])
  np.testing.assert_array_equal(out["head"]["b"], new_params["head"]["b"])
  np.testing.assert_allclose(out["head"]["w"], [1.5, 1.5], rtol=1e-7)
