"""Checkpoints written by optax_ema 0.1.0 restore and train on identically.

``tests/checkpoints/v0_1_0.py`` wrote Orbax checkpoints of the main
configurations with 0.1.0, and what a few further steps reached. Restored
without a target and converted with ``optax_ema.upgrade_state``, each one
continues to the same params, averages and count.
"""

import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).with_name("checkpoints")))
import optax_ema

import v0_1_0

pytestmark = pytest.mark.orbax  # the fixtures are Orbax checkpoints


def _restore(name):
  with ocp.CheckpointManager(v0_1_0.ROOT / name) as manager:
    assert manager.all_steps() == [v0_1_0.SAVED_AT]
    return manager.restore(v0_1_0.SAVED_AT, args=ocp.args.StandardRestore())


def _ulp(value, key):
  """One unit in the last place of a leaf's largest value, in its dtype.

  The ``scale`` leaves are bfloat16 (8 significant bits); everything else is
  float32. The largest value sets the scale because a small entry (a bias
  near zero) is the difference of larger terms and carries their rounding.
  """
  largest = float(np.max(np.abs(np.asarray(value, np.float64))))
  bits = 8 if "['scale']" in key else 24
  return 2.0 ** (np.floor(np.log2(max(largest, 1e-30))) - (bits - 1))


@pytest.mark.parametrize("name", list(v0_1_0.CONFIGS))
def test_restored_checkpoint_continues_as_0_1_0_did(name):
  tx = v0_1_0.CONFIGS[name]()
  params = v0_1_0.params0()
  like = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  raw = _restore(name)
  restored = optax_ema.upgrade_state(raw, like)
  assert jax.tree.structure(restored) == jax.tree.structure(like)
  # The conversion itself moves no value: the params and every average are
  # the checkpoint's, bit for bit.
  for got, want in zip(
    jax.tree.leaves(restored["params"]), jax.tree.leaves(raw["params"]), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  params, opt_state = restored["params"], restored["opt_state"]
  step = v0_1_0.make_step(tx)
  for _ in range(v0_1_0.CONTINUED):
    params, opt_state = step(params, opt_state)
  got = v0_1_0.observe(name, params, opt_state)
  want = dict(np.load(v0_1_0.ROOT / f"{name}.npz"))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    # The continued steps' gradients (a matmul and tanh) round differently
    # on another CPU's vector units, so the stored run is matched to two
    # units in the last place of each leaf's dtype (at its largest value);
    # on the CPU that wrote
    # the fixtures it matched bit for bit, except where the engine forms
    # `1 - decay` more precisely (the warmup schedule, SWA's running mean)
    # and power_ema's bfloat16 average, which 0.1.0 left unrounded under jit
    # (one bfloat16 place; the golden test checks it against NumPy).
    error = np.abs(np.asarray(got[key], np.float64) - value)
    assert np.all(error <= 2 * _ulp(value, key)), (key, got[key], value)


@pytest.mark.parametrize("name", ["plain", "swa"])
def test_upgraded_state_reads_nan_step_size_until_it_averages(name):
  tx = v0_1_0.CONFIGS[name]()
  params = v0_1_0.params0()
  like = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  restored = optax_ema.upgrade_state(_restore(name), like)
  params, opt_state = restored["params"], restored["opt_state"]
  assert np.isnan(optax_ema.diagnostics(opt_state, params)["decay"])
  step = v0_1_0.make_step(tx)
  for _ in range(2):  # SWA (period 2) takes a snapshot within two steps
    params, opt_state = step(params, opt_state)
  assert np.isfinite(optax_ema.diagnostics(opt_state, params)["window"])


def test_restored_without_target_and_not_upgraded_is_a_clear_error():
  raw = _restore("plain")
  with pytest.raises(ValueError, match=r"restored .*without a target.*upgrade_state"):
    optax_ema.averaged_params(raw["opt_state"])
  tx = v0_1_0.CONFIGS["plain"]()
  with pytest.raises(TypeError, match=r"plain containers.*upgrade_state"):
    tx.update(raw["params"], raw["opt_state"], raw["params"])


def test_a_checkpoint_of_another_transformation_is_rejected():
  tx = v0_1_0.CONFIGS["power_ema"]()
  params = v0_1_0.params0()
  like = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  with pytest.raises(ValueError, match="not written by the transformation"):
    optax_ema.upgrade_state(_restore("plain"), like)


@pytest.mark.parametrize("name", list(v0_1_0.CONFIGS))
def test_restore_checkpoint_restores_a_0_1_0_checkpoint_with_todays_target(name):
  # Orbax alone refuses it ("Structure mismatch ... step_size"); the helper
  # restores it without a target and upgrades it, as upgrade_state does.
  tx = v0_1_0.CONFIGS[name]()
  params = v0_1_0.params0()
  like = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  if name != "power_ema":  # PowerEmaState gained no field
    with ocp.CheckpointManager(v0_1_0.ROOT / name) as manager:
      with pytest.raises(ValueError, match=r"Structure mismatch.*step_size"):
        manager.restore(v0_1_0.SAVED_AT, args=ocp.args.StandardRestore(like))
  got = optax_ema.restore_checkpoint(v0_1_0.ROOT / name, None, like)
  want = optax_ema.upgrade_state(_restore(name), like)
  assert jax.tree.structure(got) == jax.tree.structure(like)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("target", ["concrete", "sharded"])
def test_restore_checkpoint_restores_a_0_1_0_checkpoint_into_any_kind_of_target(
  target,
):
  # Orbax words its refusal differently for these targets ("tree structures
  # do not match ... opt_state.step_size").
  tx = v0_1_0.CONFIGS["plain"]()
  params = v0_1_0.params0()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if target == "concrete":
    like = {"params": params, "opt_state": tx.init(params)}
  else:
    like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)}),
    )
  with ocp.CheckpointManager(v0_1_0.ROOT / "plain") as manager:
    with pytest.raises(ValueError, match=r"(?s)structures do not match.*step_size"):
      manager.restore(v0_1_0.SAVED_AT, args=ocp.args.StandardRestore(like))
  got = optax_ema.restore_checkpoint(v0_1_0.ROOT / "plain", None, like)
  assert jax.tree.structure(got) == jax.tree.structure(like)
  raw = _restore("plain")
  np.testing.assert_array_equal(
    np.asarray(got["opt_state"].average["dense"]["w"]),
    np.asarray(raw["opt_state"]["average"]["dense"]["w"]),
  )
  assert int(got["opt_state"].count) == int(raw["opt_state"]["count"])
  if target == "sharded":
    assert all(x.sharding == replicated for x in jax.tree.leaves(got))


def test_restore_checkpoint_names_a_step_it_does_not_hold(tmp_path):
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.StandardSave({"a": np.ones(2)}))
    manager.wait_until_finished()
  like = jax.eval_shape(lambda: {"a": np.ones(2)})
  with pytest.raises(ValueError, match=r"`step`=7 .* holds steps \[3\]"):
    optax_ema.restore_checkpoint(tmp_path / "ckpt", 7, like)


def test_restore_checkpoint_restores_todays_checkpoint_directly(tmp_path):
  tx = v0_1_0.CONFIGS["plain"]()
  params = v0_1_0.params0()
  state = {"params": params, "opt_state": tx.init(params)}
  with ocp.CheckpointManager(tmp_path / "today") as manager:
    manager.save(4, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "today") as manager:
    got = optax_ema.restore_checkpoint(manager, 4, jax.eval_shape(lambda: state))
  assert type(got["opt_state"]).__name__ == "MovingAverageState"
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_checkpoint_passes_other_mismatches_on(tmp_path):
  # A checkpoint of another tree is not taken for a 0.1.0 one.
  with ocp.CheckpointManager(tmp_path / "other") as manager:
    manager.save(1, args=ocp.args.StandardSave({"a": np.ones(2)}))
    manager.wait_until_finished()
  like = jax.eval_shape(lambda: {"b": np.ones(2)})
  with pytest.raises(ValueError, match="Structure mismatch") as info:
    optax_ema.restore_checkpoint(tmp_path / "other", 1, like)
  assert "upgrade_state" not in str(info.value)


@pytest.mark.parametrize("abstract", [True, False])
def test_upgrade_state_with_its_arguments_swapped_says_so(abstract):
  tx = v0_1_0.CONFIGS["plain"]()
  params = v0_1_0.params0()
  like = {"params": params, "opt_state": tx.init(params)}
  if abstract:
    like = jax.eval_shape(lambda: like)
  with pytest.raises(ValueError, match="look swapped") as info:
    optax_ema.upgrade_state(like, _restore("plain"))
  assert "upgrade_state(restored, like)" in str(info.value)
