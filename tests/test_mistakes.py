"""The mistakes people make, as a table: mistake -> exception -> what the message says.

Every configuration either does what it says or fails at construction or
trace time with a message that names the argument and the fix. Add a row
for each new one.
"""

import pathlib
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema
from optax_ema import posthoc
from optax_ema import schedules

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
BF16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)


def _update(tx, params=PARAMS, state=None, jit=True):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update) if jit else tx.update
  return update(jax.tree.map(jnp.ones_like, params), state, params)


def _inject(params=BF16):
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(0.1), average_decay=0.999
  )
  return _update(tx, params)


def _inject_callable_mask():
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(0.1),
    average_decay=0.9,
    mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),  # called with the count
  )
  return _update(tx)


def _plain_state_to_wrapper():
  tx = optax_ema.moving_average(optax.adam(0.1), 0.9)
  return _update(tx, state=optax.adam(0.1).init(PARAMS), jit=False)


def _restored_without_target():
  # What Orbax restores, without a target, from a MovingAverageState.
  raw = {
    "inner_state": [None, None],
    "average": PARAMS,
    "count": jnp.zeros([], jnp.int32),
  }
  return optax_ema.averaged_params({"opt_state": raw})


def _missing_key():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9)
  return tx.update({"w": jnp.ones((2, 3))}, tx.init(PARAMS), {"w": jnp.ones((2, 3))})


def _extra_key():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9)
  bigger = {**PARAMS, "c": jnp.ones(2)}
  return tx.update(bigger, tx.init(PARAMS), bigger)


def _power_state(steps=1):
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  for _ in range(steps):
    _, state = tx.update({"w": -jnp.ones(3)}, state, params)
  return state


_TMP = tempfile.TemporaryDirectory()  # removed when the tests end


def _snapshot_dir(steps=1):
  """A fresh directory holding one run's snapshot of count ``steps``."""
  directory = tempfile.mkdtemp(dir=_TMP.name)
  with posthoc.SnapshotWriter(directory, dtype=jnp.float32) as writer:
    writer.save(_power_state(steps))
  return directory


def _restore_a_step_not_saved():
  import orbax.checkpoint as ocp

  directory = pathlib.Path(tempfile.mkdtemp(dir=_TMP.name)) / "ckpt"
  with ocp.CheckpointManager(directory) as manager:
    manager.save(3, args=ocp.args.StandardSave({"a": np.ones(2)}))
    manager.wait_until_finished()
  return optax_ema.restore_checkpoint(directory, 7, {"a": np.ones(2)})


def _a_new_run_in_a_used_directory():
  return posthoc.SnapshotWriter(_snapshot_dir())  # a later run, same directory


def _a_directory_in_use():
  directory = tempfile.mkdtemp(dir=_TMP.name)
  with posthoc.SnapshotRun(directory):  # a run writing there
    return posthoc.SnapshotWriter(directory)


def _two_runs_combined():
  return posthoc.load_snapshots([_snapshot_dir(1), _snapshot_dir(2)])


def _a_new_head_in_like():
  directory = _snapshot_dir(2)
  return posthoc.reconstruct(directory, 0.07, like={"w": jnp.zeros(3), "head": 1.0})


def _traced_update_every():
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(0.1), update_every=jnp.asarray(2)
  )
  return _update(tx)


def _offload_under_pmap_init():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, offload=True)
  return jax.pmap(tx.init)({"w": jnp.ones((jax.local_device_count(), 3))})


def _offload_with_the_pmap_recipe():
  # The integrations guide's pmap recipe, with an offloaded state.
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, offload=True)
  n = jax.local_device_count()
  replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * n), tree)
  params = {"w": jnp.zeros(3)}
  p_params, p_state = replicate(params), replicate(tx.init(params))
  return jax.pmap(tx.update, axis_name="batch")(p_params, p_state, p_params)


def _param_shardings(make):
  mesh = jax.make_mesh((8,), ("d",))
  params = {"w": jnp.ones((8, 3)), "b": jnp.ones(8)}
  tx = optax_ema.moving_average(optax.adam(0.1), 0.9)
  return optax_ema.state_shardings(tx, params, make(mesh))


def _upgrade_swapped():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9)
  like = jax.eval_shape(tx.init, PARAMS)
  restored = {"inner_state": [None, None], "average": PARAMS, "count": 3}
  return optax_ema.upgrade_state(like, restored)


def _compat_zip_of_dicts():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.9)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  return opt.apply_gradients(zip(grads, PARAMS, strict=True))


# The cases that write or read Orbax checkpoints (post-hoc snapshots, saved
# states), marked `orbax` so that the fast run (a plain `pytest`) leaves
# them out.
NEEDS_ORBAX = {
  "post-hoc: a new run writing to a directory of an earlier run",
  "post-hoc: reading the snapshots of two runs together",
  "post-hoc: `like` with a leaf no snapshot stores (a new head)",
  "post-hoc: a writer on a snapshot's step folder (resuming or not)",
  "restore_checkpoint of a step the manager does not hold",
  "post-hoc: resume_from as a float count",
  "post-hoc: a target width far outside the tracked ones",
  "a 0.1.0 checkpoint restored with today's target by restore_checkpoint",
}


def _cases(table):
  """The rows of a table as parameters named by their first item."""
  return [
    pytest.param(
      *row[1:],
      id=row[0],
      marks=[pytest.mark.orbax] if row[0] in NEEDS_ORBAX else [],
    )
    for row in table
  ]


MISTAKES = [
  # (mistake, call, exception, words the message must contain)
  (
    "offload=True with a state made by jax.pmap(tx.init)",
    _offload_under_pmap_init,
    ValueError,
    ["`offload=True`", "jax.pmap", "state_shardings"],
  ),
  (
    "offload=True in the pmap recipe (JAX's memory-kind error otherwise)",
    _offload_with_the_pmap_recipe,
    ValueError,
    ["`offload=True`", "jax.pmap", "device memory"],
  ),
  (
    "optax.MultiSteps inside optax.masked",
    lambda: optax_ema.moving_average(
      optax.masked(optax.MultiSteps(optax.adam(0.1), 2), {"w": True, "b": False})
    ).init(PARAMS),
    ValueError,
    ["`optimizer`", "optax.MultiSteps inside optax.masked", "around the whole"],
  ),
  (
    "optax.MultiSteps in one branch of optax.multi_transform",
    lambda: optax_ema.moving_average(
      optax.multi_transform(
        {"acc": optax.MultiSteps(optax.adam(0.1), 2), "plain": optax.sgd(0.1)},
        {"w": "acc", "b": "plain"},
      )
    ).init(PARAMS),
    ValueError,
    ["optax.MultiSteps inside optax.multi_transform", "around the whole"],
  ),
  (
    "state_shardings given tx.init instead of tx",
    lambda: optax_ema.state_shardings(
      optax_ema.moving_average(optax.sgd(0.1)).init, PARAMS
    ),
    TypeError,
    ["`tx`", "`tx.init` was passed: pass `tx` itself"],
  ),
  (
    "state_shardings given PartitionSpecs as param_shardings",
    lambda: _param_shardings(lambda m: {"w": P("d"), "b": P()}),
    TypeError,
    ["`param_shardings` holds PartitionSpecs", "NamedSharding(mesh, spec)"],
  ),
  (
    "state_shardings given param_shardings of another structure",
    lambda: _param_shardings(lambda m: {"w": NamedSharding(m, P("d"))}),
    ValueError,
    ["`param_shardings` does not have the structure of `params`", "['b']"],
  ),
  (
    "upgrade_state with its arguments swapped",
    _upgrade_swapped,
    ValueError,
    ["look swapped", "upgrade_state(restored, like)"],
  ),
  (
    "the compat class's apply_gradients given zip() of two dicts",
    _compat_zip_of_dicts,
    TypeError,
    ["`grads_and_vars`", "zip() over two dicts", "apply_gradients((grads, params))"],
  ),
  (
    "debias=True with a constant decay of 1 (nothing is ever averaged)",
    lambda: optax_ema.moving_average(optax.sgd(0.1), 1.0, debias=True),
    ValueError,
    ["`debias=True`", "`average_decay`=1.0", "never moves"],
  ),
  (
    "debias=True with a decay schedule that is always 1",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), lambda count: jnp.float32(1.0), debias=True
    ),
    ValueError,
    ["`debias=True`", "`average_decay` schedule", "1 at every count", "never moves"],
  ),
  (
    "inject_hyperparams with bfloat16 params stores the decay in bfloat16",
    lambda: _inject(),
    TypeError,
    ["`average_decay`", "bfloat16", "hyperparam_dtype=jnp.float32"],
  ),
  (
    "a decay given as a bfloat16 array",
    lambda: optax_ema.moving_average(optax.sgd(0.1), jnp.asarray(0.999, jnp.bfloat16)),
    TypeError,
    ["`average_decay`", "bfloat16", "rounds 0.999 to 1.0"],
  ),
  (
    "a schedule that returns bfloat16",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), lambda c: jnp.asarray(0.999, jnp.bfloat16)
    ),
    TypeError,
    ["`average_decay(count)`", "bfloat16"],
  ),
  (
    "a callable mask under inject_hyperparams without static_args",
    _inject_callable_mask,
    TypeError,
    ["`mask`", "static_args=('mask',)"],
  ),
  (
    "a bare bool as the mask",
    lambda: optax_ema.moving_average(optax.sgd(0.1), mask=True),
    TypeError,
    ["`mask`", "bare bool"],
  ),
  (
    "a string as the mask",
    lambda: optax_ema.moving_average(optax.sgd(0.1), mask="w"),
    TypeError,
    ["`mask`"],
  ),
  (
    "optax.ema passed as the optimizer",
    lambda: optax_ema.moving_average(optax.ema(0.9), 0.99).init(PARAMS),
    ValueError,
    ["optax.ema", "averages the updates", "optax_ema.moving_average(optax.adam"],
  ),
  (
    "optax.ema under inject_hyperparams passed as the optimizer",
    lambda: optax_ema.moving_average(
      optax.inject_hyperparams(optax.ema)(decay=0.9), 0.99
    ).init(PARAMS),
    ValueError,
    ["optax.ema"],
  ),
  (
    "Keras `decay` meant as the average's decay, with a built optimizer",
    lambda: optax_ema.moving_average(optax.adam(0.1), decay=0.999),
    ValueError,
    ["`decay`", "pass `average_decay=`"],
  ),
  (
    "a plain optimizer state handed to the wrapped update",
    _plain_state_to_wrapper,
    TypeError,
    ["MovingAverageState", "`init`", "resume_with_average"],
  ),
  (
    "averaged_params of a state restored by Orbax without a target",
    _restored_without_target,
    ValueError,
    ["without a target", "jax.eval_shape(tx.init, params)", "upgrade_state"],
  ),
  ("params missing a key", _missing_key, ValueError, ["['b'] is missing"]),
  ("params with an extra key", _extra_key, ValueError, ["['c'] is unexpected"]),
  (
    "update without params",
    lambda: optax_ema.moving_average(optax.sgd(0.1)).update(
      PARAMS, optax_ema.moving_average(optax.sgd(0.1)).init(PARAMS)
    ),
    ValueError,
    ["tx.update(grads, state, params)"],
  ),
  (
    "sequential_update passed positionally in the decay's place",
    lambda: optax_ema.moving_average(optax.sgd(0.1), False),
    TypeError,
    ["`average_decay`", "positional `sequential_update`"],
  ),
  (
    "a decay above one",
    lambda: optax_ema.moving_average(optax.sgd(0.1), 1.5),
    ValueError,
    ["`average_decay`", "[0, 1]", "1.5"],
  ),
  (
    "update_every traced by inject_hyperparams",
    _traced_update_every,
    TypeError,
    ["`update_every`", "static_args=('update_every',)"],
  ),
  (
    "overwrite_every that is not a multiple of update_every",
    lambda: optax_ema.moving_average(optax.sgd(0.1), update_every=4, overwrite_every=6),
    ValueError,
    ["`overwrite_every`=6", "multiple of `update_every`=4"],
  ),
  (
    "overwrite_every with several averages and no overwrite_with",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), {"fast": 0.9, "slow": 0.99}, overwrite_every=10
    ),
    ValueError,
    ["ambiguous", "`overwrite_with=`", "'fast'"],
  ),
  (
    "overwrite_with without overwrite_every",
    lambda: optax_ema.moving_average(optax.sgd(0.1), overwrite_with=0),
    ValueError,
    ["`overwrite_with`", "needs `overwrite_every`"],
  ),
  (
    "reading several averages without which",
    lambda: optax_ema.averaged_params(
      optax_ema.moving_average(optax.sgd(0.1), (0.9, 0.99)).init(PARAMS)
    ),
    ValueError,
    ["2 averages", "`which=`"],
  ),
  (
    "stochastic_rounding=True with a float32 average",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), ema_dtype=jnp.float32, stochastic_rounding=True
    ),
    ValueError,
    ["`stochastic_rounding=True` needs", "bfloat16"],
  ),
  (
    "an average in float8",
    lambda: optax_ema.moving_average(optax.sgd(0.1), ema_dtype=jnp.float8_e4m3fn),
    ValueError,
    ["`ema_dtype`", "at least 16 bits"],
  ),
  (
    "a per_leaf prefix that does not fit the params",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), schedules.per_leaf({"w": 0.9})
    ).init(PARAMS),
    ValueError,
    ["per_leaf tree must be a pytree prefix"],
  ),
  (
    "a power_ema width out of range",
    lambda: optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.5)),
    ValueError,
    ["`sigma_rels`", "0.300283", "0.5"],
  ),
  (
    "post-hoc: a new run writing to a directory of an earlier run",
    _a_new_run_in_a_used_directory,
    ValueError,
    ["another training run", "`resume_from=opt_state`", "new directory"],
  ),
  (
    "post-hoc: a second writer on a directory another one holds",
    _a_directory_in_use,
    ValueError,
    ["in use by another snapshot writer", "holds its lock"],
  ),
  (
    "post-hoc: snapshots to a gs:// bucket (cannot be locked)",
    lambda: posthoc.SnapshotWriter("gs://bucket/snapshots"),
    ValueError,
    ["`directory`", "is a URL", "local or NFS directory"],
  ),
  (
    "post-hoc: reading the snapshots of two runs together",
    _two_runs_combined,
    ValueError,
    ["2 training runs", "at steps 1", "at steps 2"],
  ),
  (
    "post-hoc: `like` with a leaf no snapshot stores (a new head)",
    _a_new_head_in_like,
    ValueError,
    ["head is in `like` but in no snapshot"],
  ),
  (
    "post-hoc: saving a state that holds two power_ema states",
    lambda: posthoc.save_snapshot(
      tempfile.mkdtemp(dir=_TMP.name), (_power_state(), _power_state())
    ),
    ValueError,
    ["2 averaging states", "`posthoc.save_snapshot(directory, opt_state[0])`"],
  ),
  (
    "post-hoc: a writer on a snapshot's step folder (resuming or not)",
    lambda: posthoc.SnapshotWriter(pathlib.Path(_snapshot_dir()) / "1", resume_from=1),
    ValueError,
    ["`directory`", "snapshot step folder", "Pass the snapshot directory itself"],
  ),
  (
    "restore_checkpoint of a step the manager does not hold",
    _restore_a_step_not_saved,
    ValueError,
    ["`step`=7", "holds steps [3]", "None for the latest"],
  ),
  (
    "post-hoc: save_snapshot(opt_state, directory), arguments swapped",
    lambda: posthoc.save_snapshot(_power_state(), tempfile.mkdtemp(dir=_TMP.name)),
    TypeError,
    [
      "`directory` must be a path",
      "PowerEmaState",
      "save_snapshot(directory, opt_state)",
    ],
  ),
  (
    "post-hoc: resume_from as a float count",
    lambda: posthoc.SnapshotWriter(_snapshot_dir(), resume_from=1.0),
    TypeError,
    ["`resume_from`", "or its count (an integer)", "float"],
  ),
  (
    "post-hoc: snapshot_items without the directory's SnapshotRun",
    lambda: posthoc.snapshot_items(_power_state(), "checkpoints"),
    TypeError,
    ["`run`", "posthoc.SnapshotRun(directory)"],
  ),
  (
    "an unknown keyword argument",
    lambda: optax_ema.moving_average(optax.sgd(0.1), averge_decay=0.9),
    TypeError,
    ["averge_decay"],
  ),
  (
    "both lr and learning_rate",
    lambda: optax_ema.moving_average("sgd", lr=0.1, learning_rate=0.1),
    TypeError,
    ["both `lr` and `learning_rate`"],
  ),
  (
    "a schedule that leaves [0, 1]",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), optax.linear_schedule(0.99, 1.01, 10)
    ),
    ValueError,
    ["`average_decay` schedule must give decays in [0, 1]", "at count"],
  ),
  (
    "1 - 1 / count as a schedule (-inf at count 0)",
    lambda: optax_ema.moving_average(optax.sgd(0.1), lambda c: 1 - 1 / c),
    ValueError,
    ["-inf at count 0"],
  ),
  (
    "overwrite_every with sequential_update=False",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), sequential_update=False, overwrite_every=2
    ),
    ValueError,
    ["`overwrite_every` needs `sequential_update=True`"],
  ),
  (
    "an unknown overwrite_with",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), (0.5, 0.9), overwrite_every=2, overwrite_with="slow"
    ),
    ValueError,
    ["`overwrite_with`='slow' picks none"],
  ),
  (
    "a dtype under inject_hyperparams without static_args",
    lambda: _update(
      optax.inject_hyperparams(optax_ema.moving_average)(
        optimizer=optax.sgd(0.1), ema_dtype=jnp.bfloat16
      )
    ),
    TypeError,
    ["`ema_dtype`", "static_args=('ema_dtype',)"],
  ),
  (
    "optax.ema last in a chain passed as the optimizer",
    lambda: optax_ema.moving_average(
      optax.chain(optax.clip(1.0), optax.ema(0.9)), 0.99
    ).init(PARAMS),
    ValueError,
    ["ends with) optax.ema"],
  ),
  (
    "state_shardings of abstract params that carry no sharding",
    lambda: optax_ema.state_shardings(
      optax_ema.moving_average(optax.sgd(0.1)), jax.eval_shape(lambda: PARAMS)
    ),
    ValueError,
    ["carry no sharding", "`param_shardings=`"],
  ),
  (
    "resume_with_average given the state of the wrapped transformation",
    lambda: optax_ema.resume_with_average(
      optax_ema.moving_average(optax.sgd(0.1)),
      optax_ema.moving_average(optax.sgd(0.1)).init(PARAMS),
      PARAMS,
    ),
    ValueError,
    ["already holds an averaging state"],
  ),
  (
    "a misspelt optimizer name",
    lambda: optax_ema.moving_average("adma"),
    ValueError,
    ["'adma'", "Did you mean", "'adam'"],
  ),
]


@pytest.mark.parametrize(("call", "error", "words"), _cases(MISTAKES))
def test_mistake_raises_a_message_that_names_it(call, error, words):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an error, not a warning first
    with pytest.raises(error) as excinfo:
      call()
  message = str(excinfo.value)
  for word in words:
    assert word in message, f"{word!r} not in: {message}"


WARNINGS = [
  # (ambiguous intent, call, warning, words)
  (
    "round-to-nearest bfloat16 storage at decay 0.99 (freezes slow params)",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), 0.99, ema_dtype=jnp.bfloat16, stochastic_rounding=False
    ),
    UserWarning,
    ["`average_decay`=0.99", "half a bfloat16 place", "will not move"],
  ),
  (
    "round-to-nearest float16 storage at decay 0.999 (freezes slow params)",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), 0.999, ema_dtype=jnp.float16, stochastic_rounding=False
    ),
    UserWarning,
    ["`average_decay`=0.999", "half a float16 place", "will not move"],
  ),
  (
    "moving_average followed by optax.scale in a chain, read by averaged_params",
    lambda: optax_ema.averaged_params(
      optax.chain(optax_ema.moving_average(optax.sgd(0.1)), optax.scale(0.5)).init(
        PARAMS
      )
    ),
    UserWarning,
    ["`averaged_params`", "not last in its optax.chain", "inside the wrapper"],
  ),
  (
    "moving_average followed by optax.scale in a chain, read by diagnostics",
    lambda: optax_ema.diagnostics(
      optax.chain(optax_ema.moving_average(optax.sgd(0.1)), optax.scale(0.5)).init(
        PARAMS
      ),
      PARAMS,
    ),
    UserWarning,
    ["`diagnostics`", "not last in its optax.chain"],
  ),
  (
    "round-to-nearest bfloat16 storage with a decay it cannot resolve",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), 0.999, ema_dtype=jnp.bfloat16, stochastic_rounding=False
    ),
    UserWarning,
    ["`average_decay`=0.999", "bfloat16", "will not move"],
  ),
  (
    "round-to-nearest float16 storage with a decay it cannot resolve",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), 0.9999, ema_dtype=jnp.float16, stochastic_rounding=False
    ),
    UserWarning,
    ["float16", "will not move"],
  ),
  (
    "round-to-nearest bfloat16 storage with a schedule that reaches 0.999",
    lambda: optax_ema.moving_average(
      optax.sgd(0.1),
      optax.linear_schedule(0.9, 0.999, 1000),
      ema_dtype=jnp.bfloat16,
      stochastic_rounding=False,
    ),
    UserWarning,
    ["a schedule", "from about count", "will not move"],
  ),
  (
    "round-to-nearest bfloat16 storage of power_ema's profiles",
    lambda: optax_ema.power_ema(
      optax.sgd(0.1), ema_dtype=jnp.bfloat16, stochastic_rounding=False
    ),
    UserWarning,
    ["(gamma + 1) / t", "bfloat16", "will not move"],
  ),
  (
    "round-to-nearest storage of a decay traced by inject_hyperparams",
    lambda: _update(
      optax.inject_hyperparams(
        optax_ema.moving_average,
        static_args=("ema_dtype",),
        hyperparam_dtype=jnp.float32,
      )(
        optimizer=optax.sgd(0.1),
        average_decay=0.999,
        ema_dtype=jnp.bfloat16,
        stochastic_rounding=False,
      )
    ),
    UserWarning,
    ["is traced", "cannot be checked"],
  ),
  (
    "post-hoc: a target width far outside the tracked ones",
    lambda: posthoc.reconstruction_weights(_snapshot_dir(2), 0.01),
    UserWarning,
    ["sigma_rel=0.01 at step 2", "(above 0.1)", "extrapolation"],
  ),
  (
    "Keras `decay` with an optimizer by name (TFA's learning-rate decay)",
    lambda: optax_ema.moving_average("adam", decay=0.999),
    UserWarning,
    ["learning-rate decay", "`average_decay`"],
  ),
]


@pytest.mark.parametrize(("call", "warning", "words"), _cases(WARNINGS))
def test_ambiguous_configuration_warns_naming_it(call, warning, words):
  with pytest.warns(warning) as record:
    call()
  message = " ".join(str(r.message) for r in record)
  for word in words:
    assert word in message, f"{word!r} not in: {message}"


def _observe(tx, params, grads, set_decay=None):
  """The average, count and diagnosed decay after one jitted step."""
  state = tx.init(params)
  if set_decay is not None:
    state.hyperparams["average_decay"] = jnp.asarray(set_decay, jnp.float32)
  updates, state = jax.jit(tx.update)(grads, state, params)
  params = optax.apply_updates(params, updates)
  stats = optax_ema.diagnostics(state, params)
  return {
    "average": optax_ema.averaged_params(state, params)["w"],
    "count": stats["count"],
    "decay": stats["decay"],
  }


W = {"w": jnp.array([1.0, 2.0])}
G = {"w": jnp.array([1.0, 1.0])}
SKIPPED = {"average": [1.0, 2.0], "count": 1, "decay": float("nan")}


def _injected_decay(value):
  tx = optax.inject_hyperparams(optax_ema.moving_average)(
    optimizer=optax.sgd(0.5), average_decay=0.5
  )
  return _observe(tx, W, G, set_decay=value)


def _built_in_jit(value):
  @jax.jit
  def step(decay):
    tx = optax_ema.moving_average(optax.sgd(0.5), decay)
    updates, state = tx.update(G, tx.init(W), W)
    stats = optax_ema.diagnostics(state, optax.apply_updates(W, updates))
    return state.average["w"], stats["count"], stats["decay"]

  average, count, decay = step(jnp.float32(value))
  return {"average": average, "count": count, "decay": decay}


def _schedule_out_of_range_between_samples():
  # 45 is not among the counts sampled at construction.
  tx = optax_ema.moving_average(
    optax.sgd(0.5), lambda c: jnp.where(c == 45, 1.5, 0.5), start_step=0
  )
  state = tx.init(W)
  step = jax.jit(tx.update)
  for _ in range(45):
    _, state = step({"w": jnp.zeros(2)}, state, W)
  before = optax_ema.averaged_params(state)["w"]
  updates, state = step(G, state, W)
  params = optax.apply_updates(W, updates)
  stats = optax_ema.diagnostics(state, params)
  moved = optax_ema.averaged_params(state)["w"] - before
  return {"moved": moved, "count": stats["count"], "decay": stats["decay"]}


def _masked_optimizer():
  tx = optax_ema.moving_average(
    optax.masked(optax.sgd(0.5), {"w": True}), average_decay=0.0
  )
  return _observe(tx, W, G)


def _restore_0_1_0_with_todays_target():
  sys.path.insert(0, str(pathlib.Path(__file__).with_name("checkpoints")))
  import v0_1_0

  tx = v0_1_0.CONFIGS["plain"]()
  params = v0_1_0.params0()
  like = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  got = optax_ema.restore_checkpoint(v0_1_0.ROOT / "plain", None, like)
  step_size = got["opt_state"].step_size
  return {"count": got["opt_state"].count, "step_size": step_size}


IN_GRAPH = [
  # (case, call -> observed values, what they must be)
  ("inject_hyperparams decay set to 1.5", lambda: _injected_decay(1.5), SKIPPED),
  ("inject_hyperparams decay set to NaN", lambda: _injected_decay(np.nan), SKIPPED),
  ("inject_hyperparams decay set to -0.5", lambda: _injected_decay(-0.5), SKIPPED),
  (
    "a transform built inside jit from a traced 1.7",
    lambda: _built_in_jit(1.7),
    SKIPPED,
  ),
  (
    "a schedule that leaves [0, 1] at a count not sampled at construction",
    _schedule_out_of_range_between_samples,
    {"moved": [0.0, 0.0], "count": 46, "decay": float("nan")},
  ),
  (
    "jitted average_op with a traced decay of 1.5 keeps the average",
    lambda: {
      "average": jax.jit(optax_ema.average_op)(
        jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]), 1.5
      )
    },
    {"average": [1.0, 1.0]},
  ),
  (
    "jitted average_op with a traced NaN decay keeps the average",
    lambda: {
      "average": jax.jit(optax_ema.average_op)(
        jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]), float("nan")
      )
    },
    {"average": [1.0, 1.0]},
  ),
  (
    "jitted average_op with a traced decay of 0.75 averages",
    lambda: {
      "average": jax.jit(optax_ema.average_op)(
        jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]), 0.75
      )
    },
    {"average": [0.75, 1.25]},
  ),
  (
    "moving_average(optax.masked(opt, mask)) averages every step",
    _masked_optimizer,
    {"average": [0.5, 1.5], "count": 1, "decay": 0.0},
  ),
  (
    "a 0.1.0 checkpoint restored with today's target by restore_checkpoint",
    _restore_0_1_0_with_todays_target,
    {"count": 5, "step_size": float("nan")},
  ),
]


@pytest.mark.parametrize(("call", "want"), _cases(IN_GRAPH))
def test_in_graph_rule_gives_its_visible_result(call, want):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning either: a rule, and its result
    got = call()
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key], np.float64), value, err_msg=key)


def test_optax_ema_with_a_negative_scale_after_it_is_a_momentum_and_accepted():
  # chain(ema, scale(-lr)) is SGD with momentum: its updates descend.
  tx = optax_ema.moving_average(optax.chain(optax.ema(0.9), optax.scale(-0.1)), 0.5)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert all(float(jnp.max(u)) < 0 for u in jax.tree.leaves(updates))


def test_ambiguous_warning_points_at_the_callers_line():
  with pytest.warns(UserWarning) as record:
    optax_ema.moving_average(
      optax.sgd(0.1), 0.999, ema_dtype=jnp.bfloat16, stochastic_rounding=False
    )
  assert record[0].filename == __file__


def test_bfloat16_storage_alone_tracks_instead_of_freezing():
  # The configuration that used to freeze silently: a 0.999 average stored in
  # bfloat16 follows the params towards 2 instead of staying at 1.
  tx = optax_ema.moving_average(optax.identity(), 0.999, ema_dtype=jnp.bfloat16)
  params = {"w": jnp.ones(4096, jnp.bfloat16)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  target = {"w": jnp.full(4096, 2.0, jnp.bfloat16)}
  for _ in range(500):
    _, state = step({"w": jnp.zeros(4096, jnp.bfloat16)}, state, target)
  mean = float(jnp.mean(state.average["w"].astype(jnp.float32)))
  assert mean == pytest.approx(2 - 0.999**500, abs=2e-3)  # 1.394, unbiased


def test_inject_hyperparams_with_bfloat16_params_and_a_float32_hyperparam_dtype():
  tx = optax.inject_hyperparams(optax_ema.moving_average, hyperparam_dtype=jnp.float32)(
    optimizer=optax.sgd(0.1), average_decay=0.999
  )
  _, state = _update(tx, BF16)
  assert state.hyperparams["average_decay"].dtype == jnp.float32
  # The params moved to bf16(0.9); the average 1 - (1 - bf16(0.9)) * 0.001 of
  # the way (with a bfloat16 decay of 1.0 it would not move).
  value = float(jnp.asarray(0.9, jnp.bfloat16))
  want = 1 - (1 - value) * (1 - float(jnp.float32(0.999)))
  got = float(state.inner_state.average["w"][0, 0])
  assert got == pytest.approx(want, rel=1e-7)
  assert got < 1.0


def test_every_case_marked_orbax_is_in_a_table():
  names = {row[0] for row in MISTAKES + WARNINGS + IN_GRAPH}
  assert names >= NEEDS_ORBAX
