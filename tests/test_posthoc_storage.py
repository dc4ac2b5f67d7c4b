"""Snapshots are Orbax checkpoints: layout, asynchrony, atomicity, shardings.

Expected values are NumPy: sgd(1) with gradient -1 moves a parameter to t
after t steps, and the power EMA of 1..t with exponent g weighs i by
(i**(g+1) - (i-1)**(g+1)) / t**(g+1).
"""

import asyncio
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema
from optax_ema import posthoc
from optax_ema.posthoc import _items
from optax_ema.posthoc import _writer

TMP_SUFFIX = ".orbax-checkpoint-tmp"
LOCK = ".optax_ema.posthoc.lock"  # held by process 0 while a run writes
FINALIZE = (ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize")


@pytest.fixture(autouse=True)
def _close_writers():
  yield
  _writer._close_all()  # the writers save_snapshot opened


def _gamma(sigma_rel):
  t = sigma_rel**-2
  return max(r.real for r in np.roots([1, 7, 16 - t, 12 - t]) if abs(r.imag) < 1e-9)


def _power_average_of_steps(t, sigma_rel):
  i = np.arange(1, t + 1, dtype=np.float64)
  g = _gamma(sigma_rel)
  return ((i ** (g + 1) - (i - 1) ** (g + 1)) / float(t) ** (g + 1)) @ i


def _climb(params, n, tx=None):
  """``n`` steps of sgd(1) with gradient -1 on float leaves: x_t = x_0 + t."""
  tx = tx or optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  state = tx.init(params)
  for _ in range(n):
    grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _held_commits(monkeypatch):
  """Holds every Orbax commit until the returned event is set."""
  gate, parked = threading.Event(), threading.Event()
  original = getattr(*FINALIZE)

  async def held(self, *args, **kwargs):
    parked.set()
    await asyncio.to_thread(gate.wait)
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(*FINALIZE, held)
  return gate, parked


# --- layout ----------------------------------------------------------------------


@pytest.mark.orbax
def test_a_snapshot_is_a_committed_orbax_step_with_two_items(tmp_path):
  _params, state = _climb({"a": {"w": jnp.zeros((2, 3))}, "b": [jnp.zeros(4)]}, 10)
  path = posthoc.save_snapshot(tmp_path, state)
  posthoc.wait_until_finished()
  assert path == tmp_path / "10" and sorted(p.name for p in tmp_path.iterdir()) == [
    LOCK,
    "10",
  ]
  meta = json.loads((path / "power_ema_meta" / "metadata").read_text())
  run = meta.pop("run")
  assert meta == {
    "format": "optax_ema.posthoc/3",
    "step": 10,
    "keys": ["0.05", "0.1"],
    "sigma_rels": [0.05, 0.1],
    "dtype": "float16",
  }
  assert len(run) == 32 and int(run, 16) >= 0  # a uuid4 hex
  # Plain Orbax reads it back: {repr(sigma_rel): tree like the params}.
  metadata = ocp.PyTreeCheckpointHandler().metadata(path / "power_ema").tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  stored = ocp.PyTreeCheckpointer().restore(
    path / "power_ema", args=ocp.args.PyTreeRestore(restore_args=as_numpy)
  )
  assert set(stored) == {"0.05", "0.1"}
  w = stored["0.1"]["a"]["w"]
  assert w.dtype == np.float16 and w.shape == (2, 3)
  np.testing.assert_array_equal(w, np.float16(_power_average_of_steps(10, 0.10)))


@pytest.mark.orbax
def test_non_float_leaves_are_stored_and_keys_and_masked_leaves_are_not(tmp_path):
  params = {"w": jnp.zeros(3), "i": jnp.arange(2), "k": jax.random.key(0), "n": None}
  tx = optax_ema.power_ema(
    optax.identity(), mask={"w": True, "i": True, "k": True, "n": True}
  )
  float0 = np.zeros((), jax.dtypes.float0)  # no update of a PRNG key
  updates = {"w": jnp.ones(3), "i": jnp.ones(2, jnp.int32), "k": float0, "n": None}
  _, state = tx.update(updates, tx.init(params), params)
  posthoc.save_snapshot(tmp_path, state)
  (snap,) = posthoc.load_snapshots(tmp_path)
  assert snap.tree["n"] is None and snap.tree["k"] is None
  assert snap.tree["w"].dtype == np.float16 and snap.tree["i"].dtype == np.int32


# --- asynchronous and atomic writes --------------------------------------------------


@pytest.mark.orbax
def test_save_returns_before_the_write_commits(tmp_path, monkeypatch):
  gate, parked = _held_commits(monkeypatch)
  params, state = _climb({"w": jnp.zeros(3)}, 5)
  try:
    path = posthoc.save_snapshot(tmp_path, state)
    assert parked.wait(30)  # the background write reached its commit
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "5" + TMP_SUFFIX]
    params, state = _climb(params, 1)  # training goes on meanwhile
  finally:
    gate.set()
  posthoc.wait_until_finished(tmp_path)
  assert path.is_dir() and [s.step for s in posthoc.load_snapshots(tmp_path)] == [5]


@pytest.mark.orbax
def test_reads_in_the_same_process_see_every_snapshot_saved_before(
  tmp_path, monkeypatch
):
  gate, parked = _held_commits(monkeypatch)
  _, state = _climb({"w": jnp.zeros(3)}, 20)
  try:
    posthoc.save_snapshot(tmp_path, state)
    assert parked.wait(30)
    threading.Timer(0.3, gate.set).start()  # commits while load_snapshots waits
    assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [20]
  finally:
    gate.set()


@pytest.mark.orbax
def test_load_snapshots_reads_metadata_only(tmp_path, monkeypatch):
  _, state = _climb({"w": jnp.zeros(3)}, 4)
  posthoc.save_snapshot(tmp_path, state)

  def no_arrays(*args, **kwargs):
    raise AssertionError("an array was read")

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", no_arrays)
  (snap,) = posthoc.load_snapshots(tmp_path)
  assert snap.step == 4 and snap.tree["w"].shape == (3,)
  with pytest.raises(AssertionError, match="an array was read"):
    posthoc.reconstruct(tmp_path, 0.07)  # the patch is effective


_CRASHING_WRITER = r"""
import asyncio, sys, time
import jax.numpy as jnp, optax, orbax.checkpoint as ocp
import optax_ema
from optax_ema import posthoc

async def park(self, *args, **kwargs):
  print("PARKED", flush=True)  # data written, commit (rename) not done
  await asyncio.Event().wait()

tx = optax_ema.power_ema(optax.sgd(1.0))
params = {"w": jnp.zeros(1000)}
state = tx.init(params)
writer = posthoc.SnapshotWriter(sys.argv[1])
for t in range(1, 31):
  updates, state = tx.update({"w": -jnp.ones(1000)}, state, params)
  params = optax.apply_updates(params, updates)
  if t % 10 == 0:
    if t == 30:
      ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = park
    writer.save(state)
    if t < 30:
      writer.wait_until_finished()
time.sleep(600)
"""


def _wait_for_line(proc, line, timeout):
  lines = queue.Queue()
  threading.Thread(
    target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True
  ).start()
  while True:
    try:
      got = lines.get(timeout=timeout)
    except queue.Empty:
      raise AssertionError(
        f"the writer did not print {line!r} in {timeout} s"
      ) from None
    if got == line:
      return


@pytest.mark.orbax
@pytest.mark.subprocess
def test_a_writer_killed_mid_write_leaves_a_readable_directory(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.Popen(
    [sys.executable, "-c", _CRASHING_WRITER, str(tmp_path)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    _wait_for_line(proc, "PARKED", timeout=60)
    assert (tmp_path / ("30" + TMP_SUFFIX)).is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=10)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  assert (tmp_path / ("30" + TMP_SUFFIX)).is_dir()  # the half snapshot is there
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [10, 20]  # ignored
  got = posthoc.reconstruct(tmp_path, 0.10)
  np.testing.assert_allclose(got["w"], _power_average_of_steps(20, 0.10), rtol=1e-3)
  # The killed process's lock is gone with it: the run continues from its
  # checkpoint of count 20, and its writer removes the leftover.
  _, state = _climb({"w": jnp.zeros(1000)}, 20, optax_ema.power_ema(optax.sgd(1.0)))
  with posthoc.SnapshotWriter(tmp_path, resume_from=state) as writer:
    _, state = _climb({"w": jnp.zeros(1000)}, 30, optax_ema.power_ema(optax.sgd(1.0)))
    writer.save(state)
  assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "10", "20", "30"]
  assert len({s.run for s in posthoc.load_snapshots(tmp_path)}) == 1


# --- shardings ------------------------------------------------------------------


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def _sharded_run(directory, mesh):
  specs = {"w": P("data", "model"), "b": P("model")}
  rng = np.random.default_rng(3)
  values = {"w": rng.normal(size=(8, 16)), "b": rng.normal(size=16)}
  params = {
    k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(mesh, specs[k]))
    if mesh is not None
    else jnp.asarray(v, jnp.float32)
    for k, v in values.items()
  }
  tx = optax_ema.power_ema(optax.adam(0.1), sigma_rels=(0.05, 0.10))
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, state, t):
    grads = jax.tree.map(lambda p: p - jnp.sin(t / 5.0), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with posthoc.SnapshotWriter(directory, every=10, dtype=np.float32) as writer:
    for t in range(1, 31):
      params, state = step(params, state, t)
      writer(state, t)
  return params, state


@pytest.mark.orbax
def test_sharded_round_trip_on_eight_devices(tmp_path):
  mesh = _mesh()
  _params, state = _sharded_run(tmp_path / "sharded", mesh)
  assert state.averages["0.1"]["w"].sharding.spec == P("data", "model")
  like = {
    "w": jax.ShapeDtypeStruct(
      (8, 16), jnp.float32, sharding=NamedSharding(mesh, P("model", "data"))
    ),
    "b": jax.ShapeDtypeStruct(
      (16,), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))
    ),
  }
  got = posthoc.reconstruct(tmp_path / "sharded", 0.07, like=like)
  assert got["w"].sharding.spec == P("model", "data")
  assert got["b"].sharding.spec == P("data") and got["b"].dtype == jnp.bfloat16
  _sharded_run(tmp_path / "single", None)
  want = posthoc.reconstruct(tmp_path / "single", 0.07)
  np.testing.assert_allclose(np.asarray(got["w"]), want["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(got["b"], np.float32), want["b"], rtol=1e-2, atol=1e-2
  )
  tracked = posthoc.reconstruct(tmp_path / "sharded", 0.10, like=like)
  np.testing.assert_allclose(
    np.asarray(tracked["w"]), np.asarray(state.averages["0.1"]["w"]), rtol=1e-6
  )


@pytest.mark.orbax
def test_offloaded_profiles_are_cast_where_they_live(tmp_path):
  mesh = _mesh()
  host = NamedSharding(mesh, P("data", "model"), memory_kind="pinned_host")
  _, state = _climb({"w": jnp.zeros((8, 8))}, 6)
  state = state._replace(
    averages={k: {"w": jax.device_put(v["w"], host)} for k, v in state.averages.items()}
  )
  assert state.averages["0.05"]["w"].sharding.memory_kind == "pinned_host"
  _, tree, _ = _items.storage_tree(state, np.float16, "test", None)
  for profile in tree.values():
    assert profile["w"].dtype == np.float16
    assert profile["w"].sharding == host  # same spec and memory kind
  posthoc.save_snapshot(tmp_path, state)
  like = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=host)}
  got = posthoc.reconstruct(tmp_path, 0.05, like=like)
  assert got["w"].sharding == host
  np.testing.assert_allclose(got["w"], _power_average_of_steps(6, 0.05), rtol=1e-3)


# --- like ---------------------------------------------------------------------------


def _masked_run(directory):
  params = {"w": jnp.zeros(3), "frozen": jnp.ones(2), "k": jax.random.key(1)}
  mask = {"w": True, "frozen": False, "k": False}
  tx = optax_ema.power_ema(optax.masked(optax.sgd(1.0), mask), mask=mask)
  state = tx.init(params)
  for _ in range(8):
    grads = {"w": -jnp.ones(3), "frozen": jnp.zeros(2), "k": params["k"]}
    updates, state = tx.update(grads, state, params)
    params = {
      "w": params["w"] + updates["w"],
      **{k: params[k] for k in ("frozen", "k")},
    }
  posthoc.save_snapshot(directory, state)
  return params


@pytest.mark.orbax
def test_like_supplies_the_leaves_that_are_not_averaged(tmp_path):
  params = _masked_run(tmp_path)
  like = {
    "w": jax.ShapeDtypeStruct((3,), jnp.float32),
    "frozen": params["frozen"],
    "k": params["k"],
    "extra": None,
  }
  got = posthoc.reconstruct(tmp_path, 0.05, like=like)
  np.testing.assert_allclose(got["w"], _power_average_of_steps(8, 0.05), rtol=1e-3)
  assert got["frozen"] is params["frozen"] and got["k"] is params["k"]
  assert got["extra"] is None


@pytest.mark.orbax
def test_like_without_a_value_where_nothing_is_stored_is_an_error(tmp_path):
  params = _masked_run(tmp_path)
  like = {
    "w": params["w"],
    "frozen": jax.ShapeDtypeStruct((2,), jnp.float32),
    "k": params["k"],
  }
  with pytest.raises(ValueError, match=r"`like` has no value for frozen"):
    posthoc.reconstruct(tmp_path, 0.05, like=like)


@pytest.mark.orbax
def test_like_with_a_leaf_no_snapshot_stores_is_an_error(tmp_path):
  # A new head added after training: not silently taken from `like`.
  params = _masked_run(tmp_path)
  like = {**params, "head": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"head is in `like` but in no snapshot"):
    posthoc.reconstruct(tmp_path, 0.05, like=like)
  nested = {**params, "extra": {"a": jnp.ones(2), "b": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"extra/a, extra/b are in `like`"):
    posthoc.reconstruct(tmp_path, 0.05, like=nested)
  # A masked-out leaf is stored as None: `like` supplies it (no error).
  got = posthoc.reconstruct(tmp_path, 0.05, like=params)
  assert got["frozen"] is params["frozen"]


@pytest.mark.orbax
def test_two_power_ema_states_are_refused_with_a_call_that_fits(tmp_path):
  tx = optax_ema.power_ema(optax.sgd(1.0))
  params = {"w": jnp.zeros(2)}
  _, one = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  with pytest.raises(ValueError) as excinfo:
    posthoc.save_snapshot(tmp_path, (one, one))
  message = str(excinfo.value)
  assert "2 averaging states" in message
  assert "`posthoc.save_snapshot(directory, opt_state[0])`" in message
  with posthoc.SnapshotWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match=r"`writer\.save\(opt_state\[0\]\)`"):
      writer.save((one, one))
  with posthoc.SnapshotRun(tmp_path / "items") as run:
    with pytest.raises(ValueError, match=r"snapshot_items\(opt_state\[0\], run\)"):
      posthoc.snapshot_items([one, one], run)
  posthoc.save_snapshot(tmp_path / "fixed", (one, one)[0])  # the fix works


@pytest.mark.orbax
def test_like_of_another_structure_or_shape_is_an_error(tmp_path):
  _, state = _climb({"w": jnp.zeros(3)}, 4)
  posthoc.save_snapshot(tmp_path, state)
  with pytest.raises(ValueError, match=r"w is stored in the snapshots but missing"):
    posthoc.reconstruct(tmp_path, 0.07, like={"v": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"w has shape \(2,\), the snapshots \(3,\)"):
    posthoc.reconstruct(tmp_path, 0.07, like={"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"dtype int32 at w"):
    posthoc.reconstruct(tmp_path, 0.07, like={"w": jnp.zeros(3, jnp.int32)})


# --- beside your own CheckpointManager ---------------------------------------------


@pytest.mark.orbax
def test_snapshot_items_fit_in_your_own_checkpoint_manager(tmp_path):
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  with posthoc.SnapshotRun(tmp_path) as run, ocp.CheckpointManager(tmp_path) as manager:
    for step in range(1, 7):
      updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
      params = optax.apply_updates(params, updates)
      items = {"params": ocp.args.StandardSave(params)}
      if step % 2 == 0:  # every other checkpoint is also a snapshot
        items |= posthoc.snapshot_items(state, run)
      manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2, 3, 4, 5, 6]
  snaps = posthoc.load_snapshots(tmp_path)
  assert [s.step for s in snaps] == [2, 4, 6]
  assert {s.run for s in snaps} == {run.identity} and len(run.identity) == 32
  got = posthoc.reconstruct(tmp_path, 0.10)
  np.testing.assert_allclose(got["w"], _power_average_of_steps(6, 0.10), rtol=1e-3)


# --- bad input ------------------------------------------------------------------------


def test_float16_overflow_is_an_error_and_writes_nothing(tmp_path):
  _, state = _climb({"w": jnp.full(2, 1e6)}, 1)
  with pytest.raises(ValueError, match=r"\['w'\] is not finite in float16.*float32"):
    posthoc.save_snapshot(tmp_path, state)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.orbax
def test_steps_must_increase(tmp_path):
  _, state10 = _climb({"w": jnp.zeros(2)}, 10)
  _, state20 = _climb({"w": jnp.zeros(2)}, 20)
  with posthoc.SnapshotWriter(tmp_path) as writer:
    writer.save(state20)
    with pytest.raises(ValueError, match="of count 20 and cannot take one of count 10"):
      writer.save(state10)
  # Also across writers of the run.
  with posthoc.SnapshotWriter(tmp_path, resume_from=state20) as writer:
    with pytest.raises(ValueError, match="holds the snapshot of count 20: the state"):
      writer.save(state20)


@pytest.mark.orbax
def test_a_state_that_averaged_nothing_yet_is_not_saved(tmp_path):
  state = optax_ema.power_ema(optax.sgd(0.1)).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="averaged nothing yet"):
    posthoc.save_snapshot(tmp_path, state)


@pytest.mark.orbax
def test_saving_again_before_the_next_real_step_says_why(tmp_path):
  # Inside MultiSteps the count is of real steps: a micro-step adds none.
  tx = optax.MultiSteps(optax_ema.power_ema(optax.sgd(0.1)), 2)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  with posthoc.SnapshotWriter(tmp_path) as writer:
    for step in range(1, 4):
      updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
      params = optax.apply_updates(params, updates)
      if step == 2:
        writer.save(state)
      if step == 3:  # a micro-step: still count 1
        with pytest.raises(ValueError, match=r"not optax\.MultiSteps micro-steps"):
          writer.save(state)


@pytest.mark.orbax
def test_one_open_writer_per_directory(tmp_path):
  _, state = _climb({"w": jnp.zeros(2)}, 3)
  with posthoc.SnapshotWriter(tmp_path):
    with pytest.raises(ValueError, match="already has an open SnapshotWriter"):
      posthoc.SnapshotWriter(tmp_path)
    path = posthoc.save_snapshot(tmp_path, state)  # goes through `writer`
  assert path.is_dir()


def test_saving_a_state_without_power_ema_is_an_error(tmp_path):
  state = optax_ema.moving_average(optax.sgd(0.1)).init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"needs the state of optax_ema\.power_ema"):
    posthoc.save_snapshot(tmp_path, state)


@pytest.mark.orbax
def test_the_power_ema_state_is_found_inside_a_chain(tmp_path):
  tx = optax.chain(optax.clip(1.0), optax_ema.power_ema(optax.sgd(0.1)))
  params = {"w": jnp.ones(2)}
  _, state = tx.update(params, tx.init(params), params)
  posthoc.save_snapshot(tmp_path, state)
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [1]


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_writer_rejects_bad_interval(tmp_path, every):
  with pytest.raises(ValueError, match="`every` must be None or a positive int"):
    posthoc.SnapshotWriter(tmp_path, every=every)


def test_writer_rejects_non_float_dtype(tmp_path):
  with pytest.raises(ValueError, match="`dtype` must be a floating point dtype"):
    posthoc.SnapshotWriter(tmp_path, dtype=np.int8)


@pytest.mark.orbax
def test_calling_a_writer_without_every_is_an_error(tmp_path):
  _, state = _climb({"w": jnp.zeros(2)}, 1)
  with posthoc.SnapshotWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="`every=None`"):
      writer(state, 1)


def test_no_snapshots_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="`directory_or_snapshots` is empty"):
    posthoc.load_snapshots([])
  with pytest.raises(ValueError, match="holds no snapshots"):
    posthoc.load_snapshots(tmp_path)
  with pytest.raises(ValueError, match="does not exist"):
    posthoc.load_snapshots(tmp_path / "missing")


@pytest.mark.orbax
def test_snapshots_of_different_trees_are_an_error(tmp_path):
  for name, params, n in [("a", {"w": jnp.zeros(3)}, 2), ("b", {"v": jnp.zeros(3)}, 4)]:
    posthoc.save_snapshot(tmp_path / name, _climb(params, n)[1])
  posthoc.save_snapshot(tmp_path / "c", _climb({"w": jnp.zeros(4)}, 6)[1])
  with pytest.raises(ValueError, match=r"different parameter trees.* differ at v, w"):
    posthoc.load_snapshots([tmp_path / "a", tmp_path / "b"])
  with pytest.raises(ValueError, match=r"w is \(\(4,\), 'float16'\)"):
    posthoc.load_snapshots([tmp_path / "a", tmp_path / "c"])
  with pytest.raises(ValueError, match="Two snapshots have step 2"):
    posthoc.load_snapshots([tmp_path / "a", tmp_path / "a"])


@pytest.mark.orbax
def test_a_step_of_another_format_is_an_error(tmp_path):
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.Composite(power_ema_meta=ocp.args.JsonSave({})))
  with pytest.raises(ValueError, match=r"is not an optax_ema\.posthoc snapshot"):
    posthoc.load_snapshots(tmp_path)


@pytest.mark.orbax
def test_a_step_directory_is_read_as_one_snapshot(tmp_path):
  _, state = _climb({"w": jnp.zeros(2)}, 3)
  path = posthoc.save_snapshot(tmp_path, state)
  assert [s.path for s in posthoc.load_snapshots(path)] == [pathlib.Path(path)]


def test_float64_storage_without_x64_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"`dtype=float64` needs 64-bit JAX arrays"):
    posthoc.SnapshotWriter(tmp_path, dtype=np.float64)


def test_an_old_orbax_is_refused_naming_the_install(monkeypatch):
  from optax_ema.posthoc import _orbax

  monkeypatch.setattr(ocp, "__version__", "0.11.9")
  _orbax.load.cache_clear()
  try:
    with pytest.raises(ImportError, match=r"orbax-checkpoint>=0\.12.*found 0\.11\.9"):
      _orbax.load()
  finally:
    monkeypatch.undo()
    _orbax.load.cache_clear()
  assert _orbax.load() is ocp


_WITHOUT_ORBAX = r"""
import sys

class NoOrbax:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "orbax":
      raise ImportError("orbax is not installed")

sys.meta_path.insert(0, NoOrbax())
import optax_ema  # the package imports without orbax
from optax_ema import posthoc
try:
  posthoc.load_snapshots(sys.argv[1])
except ImportError as err:
  print(err)
"""


@pytest.mark.subprocess
def test_without_orbax_the_package_imports_and_posthoc_says_what_to_install(
  tmp_path,
):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  proc = subprocess.run(
    [sys.executable, "-c", _WITHOUT_ORBAX, str(tmp_path)],
    env=env | {"JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    check=False,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert "needs orbax-checkpoint>=0.12" in proc.stdout


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.orbax
def test_training_may_donate_the_state_while_snapshots_are_written(tmp_path, dtype):
  tx = optax_ema.power_ema(optax.sgd(1.0))

  def train(params, state):
    updates, state = tx.update({"w": -jnp.ones_like(params["w"])}, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(train, donate_argnums=(0, 1))
  params = {"w": jnp.zeros((64, 64))}
  state = tx.init(params)
  with posthoc.SnapshotWriter(tmp_path, every=1, dtype=dtype) as writer:
    for t in range(1, 6):
      params, state = step(params, state)
      writer(state, t)  # the next step donates the buffers just saved
  got = posthoc.reconstruct(tmp_path, 0.10)
  np.testing.assert_allclose(got["w"], _power_average_of_steps(5, 0.10), rtol=1e-3)
