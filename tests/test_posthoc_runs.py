"""A snapshot directory belongs to one training run.

Each snapshot records its run's identity; a writer refuses a directory that
holds another run's snapshots unless told to continue that run
(``resume_from=``, which moves the abandoned trajectory aside), a second
writer is refused by a lock that dies with its process, ``load_snapshots``
refuses to combine runs, and directories of format ``optax_ema.posthoc/2``
(no identity, tests/checkpoints/posthoc_format2) still load.

Expected values: sgd(1) with gradient -1 moves a parameter to t after t
steps; the tracked profile sigma_rel at step t is the power EMA of 1..t,
weights (i**(g+1) - (i-1)**(g+1)) / t**(g+1).
"""

import json
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_ema
from optax_ema import posthoc

FORMAT2 = pathlib.Path(__file__).with_name("checkpoints") / "posthoc_format2"
LOCK = ".optax_ema.posthoc.lock"


def _gamma(sigma_rel):
  t = sigma_rel**-2
  return max(r.real for r in np.roots([1, 7, 16 - t, 12 - t]) if abs(r.imag) < 1e-9)


def _power_average_of_steps(t, sigma_rel):
  i = np.arange(1, t + 1, dtype=np.float64)
  g = _gamma(sigma_rel)
  return ((i ** (g + 1) - (i - 1) ** (g + 1)) / float(t) ** (g + 1)) @ i


def _states(n, every, dim=3):
  """The power-EMA states of sgd(1), gradient -1, at every ``every`` steps."""
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  params = {"w": jnp.zeros(dim)}
  state = tx.init(params)
  out = {}
  for t in range(1, n + 1):
    updates, state = tx.update({"w": -jnp.ones(dim)}, state, params)
    params = optax.apply_updates(params, updates)
    if t % every == 0:
      out[t] = state
  return out


def _write(directory, states, **kwargs):
  with posthoc.SnapshotWriter(directory, dtype=np.float32, **kwargs) as writer:
    for state in states:
      writer.save(state)
  return writer.run.identity


def _listing(directory):
  return sorted(p.name for p in pathlib.Path(directory).iterdir())


# --- one identity per run ------------------------------------------------------


@pytest.mark.orbax
def test_the_snapshots_of_a_run_share_its_identity_and_runs_differ(tmp_path):
  states = _states(40, 10)
  first = _write(tmp_path / "a", [states[10], states[20]])
  second = _write(tmp_path / "b", [states[30]])
  snaps = posthoc.load_snapshots(tmp_path / "a")
  assert [s.run for s in snaps] == [first, first]
  assert len(first) == 32 and int(first, 16) >= 0 and first != second
  meta = json.loads((tmp_path / "a" / "10" / "power_ema_meta" / "metadata").read_text())
  assert meta["format"] == "optax_ema.posthoc/3" and meta["run"] == first


@pytest.mark.orbax
def test_save_snapshot_keeps_one_run_per_directory_and_process(tmp_path):
  states = _states(30, 10)
  for t in (10, 20):
    posthoc.save_snapshot(tmp_path, states[t])
  # An explicit writer in the same process carries the process's run on.
  with posthoc.SnapshotWriter(tmp_path) as writer:
    writer.save(states[30])
  runs = {s.run for s in posthoc.load_snapshots(tmp_path)}
  assert runs == {writer.run.identity}


@pytest.mark.orbax
def test_resume_from_is_refused_where_this_process_already_writes(tmp_path):
  states = _states(20, 10)
  posthoc.save_snapshot(tmp_path, states[10])
  with pytest.raises(ValueError, match="drop `resume_from`"):
    posthoc.SnapshotWriter(tmp_path, resume_from=states[10])
  posthoc.save_snapshot(tmp_path, states[20])  # the run is still open
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [10, 20]


# --- a new run is refused where another one wrote --------------------------------


@pytest.mark.orbax
def test_a_new_writer_is_refused_in_a_directory_of_another_run(tmp_path):
  states = _states(30, 10)
  run = _write(tmp_path, [states[10], states[20]])
  before = _listing(tmp_path)
  with pytest.raises(ValueError) as excinfo:
    posthoc.SnapshotWriter(tmp_path)
  message = str(excinfo.value)
  for word in [f"run {run}", "steps 10, 20", "`resume_from=opt_state`", "new dir"]:
    assert word in message, message
  with pytest.raises(ValueError, match="another training run"):
    posthoc.save_snapshot(tmp_path, states[30])
  assert _listing(tmp_path) == before  # nothing written, nothing moved
  # The refused writers released the lock: the run can be continued.
  assert _write(tmp_path, [states[30]], resume_from=states[20]) == run


@pytest.mark.orbax
def test_continuing_adopts_the_identity_and_moves_the_newer_snapshots_aside(
  tmp_path,
):
  directory = tmp_path / "snaps"
  states = _states(40, 10)
  run = _write(directory, [states[t] for t in (10, 20, 30, 40)])
  # Training resumes from its checkpoint of count 20: 30 and 40 were written
  # after it, by a trajectory that no longer exists.
  with pytest.warns(UserWarning) as record:
    with posthoc.SnapshotWriter(
      directory, dtype=np.float32, resume_from=states[20]
    ) as writer:
      assert writer.run.identity == run
      other = _states(30, 10, dim=3)[30]  # the new trajectory's step 30
      writer.save(other)
  (warning,) = record
  moved = tmp_path / "snaps.abandoned-after-20"
  assert warning.filename == __file__
  for word in [f"run {run}", "from count 20", "steps 30, 40", str(moved)]:
    assert word in str(warning.message), warning.message
  assert [s.step for s in posthoc.load_snapshots(directory)] == [10, 20, 30]
  assert {s.run for s in posthoc.load_snapshots(directory)} == {run}
  # Moved, never deleted: the abandoned snapshots are still readable there.
  assert [s.step for s in posthoc.load_snapshots(moved)] == [30, 40]
  # A second restart from the same count moves to a new sibling.
  with pytest.warns(UserWarning, match="steps 30"):
    posthoc.SnapshotRun(directory, resume_from=20).close()
  assert (tmp_path / "snaps.abandoned-after-20.2" / "30").is_dir()


@pytest.mark.orbax
def test_continuing_from_the_latest_snapshot_moves_nothing_and_warns_nothing(
  tmp_path,
):
  states = _states(30, 10)
  run = _write(tmp_path, [states[10], states[20]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _write(tmp_path, [states[30]], resume_from=states[20]) == run
    assert _write(tmp_path / "new", [states[10]], resume_from=states[20]) != run
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [10, 20, 30]


@pytest.mark.parametrize("bad", [True, -1, 20.0, "20", np.float32(20)])
def test_resume_from_must_be_a_state_or_a_count(tmp_path, bad):
  with pytest.raises((TypeError, ValueError), match="`resume_from`") as err:
    posthoc.SnapshotWriter(tmp_path, resume_from=bad)
  assert "moving_average" not in str(err.value)  # not about the state's type


@pytest.mark.parametrize("kind", ["jax", "numpy"])
@pytest.mark.orbax
def test_resume_from_takes_the_count_as_an_integer_array(tmp_path, kind):
  states = _states(30, 10)
  run = _write(tmp_path, [states[t] for t in (10, 20, 30)])
  count = states[20].count  # a JAX int32 scalar
  count = count if kind == "jax" else np.asarray(count)
  with pytest.warns(UserWarning, match="steps 30"):
    with posthoc.SnapshotRun(tmp_path, resume_from=count) as again:
      assert again.identity == run
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [10, 20]


@pytest.mark.parametrize("inside", ["30", "30/power_ema", "30/new"])
@pytest.mark.orbax
def test_a_writer_is_refused_in_a_snapshot_step_folder_or_below(tmp_path, inside):
  states = _states(30, 10)
  _write(tmp_path, [states[t] for t in (10, 20, 30)])
  before = _listing(tmp_path / "30")
  for resume_from in (None, states[30]):
    with pytest.raises(ValueError, match="snapshot step folder") as err:
      posthoc.SnapshotWriter(tmp_path / inside, resume_from=resume_from)
    assert repr(str(tmp_path)) in str(err.value)  # the directory to use
  assert _listing(tmp_path / "30") == before  # nothing created, no lock


# --- the lock ------------------------------------------------------------------


def test_a_second_run_on_an_open_directory_is_refused(tmp_path):
  with posthoc.SnapshotRun(tmp_path) as run:
    assert (tmp_path / LOCK).is_file()
    # In this process: said so, not as if another process held it.
    with pytest.raises(
      ValueError, match=r"another snapshot writer of this process \(process"
    ) as err:
      posthoc.SnapshotRun(tmp_path)
    assert f"process {os.getpid()} " in str(err.value)
    assert "is still open" in str(err.value)
    with pytest.raises(ValueError, match="in use by another snapshot writer"):
      posthoc.SnapshotWriter(tmp_path)
    assert not run.closed
  assert run.closed
  posthoc.SnapshotRun(tmp_path).close()  # released


_HOLDER = r"""
import sys, time
import jax.numpy as jnp, numpy as np, optax
import optax_ema
from optax_ema import posthoc

tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
params = {"w": jnp.zeros(3)}
_, state = tx.update({"w": -jnp.ones(3)}, tx.init(params), params)
writer = posthoc.SnapshotWriter(sys.argv[1], dtype=np.float32)
writer.save(state)
writer.wait_until_finished()
print("OPEN", writer.run.identity, flush=True)
time.sleep(600)
"""


@pytest.mark.orbax
@pytest.mark.subprocess
def test_the_lock_is_held_across_processes_and_released_when_its_holder_dies(
  tmp_path,
):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(tmp_path)],
    env=env | {"JAX_PLATFORMS": "cpu"},
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    lines = queue.Queue()
    threading.Thread(
      target=lambda: lines.put(proc.stdout.readline()), daemon=True
    ).start()
    line = lines.get(timeout=120).split()  # the holder saved and holds the lock
    assert line[:1] == ["OPEN"], line
    run = line[1]
    # Another process's writer holds it: even continuing its run is refused.
    with pytest.raises(ValueError, match=f"process {proc.pid} on .* holds its lock"):
      posthoc.SnapshotWriter(tmp_path, resume_from=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=10)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  state = _states(2, 2)[2]
  assert _write(tmp_path, [state], resume_from=1) == run  # the OS released it
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [1, 2]


@pytest.mark.parametrize("url", ["gs://bucket/snapshots", "s3://bucket/snapshots"])
def test_an_object_store_url_is_refused_as_it_cannot_be_locked(url):
  state = _states(1, 1)[1]
  with pytest.raises(ValueError, match=r"`directory` .* is a URL.*local or NFS"):
    posthoc.SnapshotWriter(url)
  with pytest.raises(ValueError, match=r"is a URL"):
    posthoc.save_snapshot(url, state)
  assert not pathlib.Path("gs:").exists() and not pathlib.Path("s3:").exists()


# --- reading refuses to combine runs ---------------------------------------------


@pytest.mark.orbax
def test_load_snapshots_refuses_two_runs_and_lists_them_with_their_steps(tmp_path):
  states = _states(40, 10)
  first = _write(tmp_path / "a", [states[10], states[20]])
  second = _write(tmp_path / "b", [states[30], states[40]])
  with pytest.raises(ValueError) as excinfo:
    posthoc.load_snapshots([tmp_path / "a", tmp_path / "b"])
  message = str(excinfo.value)
  for word in [
    "2 training runs",
    f"run {first} at steps 10, 20",
    f"run {second} at steps 30, 40",
    str(tmp_path / "b"),
  ]:
    assert word in message, message
  with pytest.raises(ValueError, match="2 training runs"):
    posthoc.reconstruct([tmp_path / "a", tmp_path / "b"], 0.07)
  # A directory into which another run's step was copied by hand.
  shutil.copytree(tmp_path / "b" / "30", tmp_path / "a" / "30")
  with pytest.raises(ValueError, match=f"run {second} at steps 30"):
    posthoc.load_snapshots(tmp_path / "a")
  with pytest.raises(ValueError, match="holds the snapshots of 2 training runs"):
    posthoc.SnapshotWriter(tmp_path / "a", resume_from=20)


@pytest.mark.orbax
def test_the_command_line_reports_two_runs_as_an_error(tmp_path, capsys):
  states = _states(20, 10)
  _write(tmp_path / "a", [states[10]])
  _write(tmp_path / "b", [states[20]])
  shutil.copytree(tmp_path / "b" / "20", tmp_path / "a" / "20")
  assert posthoc.main([str(tmp_path / "a"), "--list"]) == 2
  assert "2 training runs" in capsys.readouterr().err


# --- snapshot_items beside your own CheckpointManager -------------------------------


def test_snapshot_items_need_an_open_run(tmp_path):
  state = _states(1, 1)[1]
  with pytest.raises(TypeError, match=r"`run` must be the posthoc\.SnapshotRun"):
    posthoc.snapshot_items(state, str(tmp_path))
  with posthoc.SnapshotRun(tmp_path) as run:
    pass
  with pytest.raises(ValueError, match=r"`run` .* is closed"):
    posthoc.snapshot_items(state, run)


@pytest.mark.orbax
def test_snapshot_items_continue_a_run_like_a_writer(tmp_path):
  states = _states(30, 10)
  with posthoc.SnapshotRun(tmp_path) as run, ocp.CheckpointManager(tmp_path) as mgr:
    for t in (10, 20, 30):
      mgr.save(t, args=ocp.args.Composite(**posthoc.snapshot_items(states[t], run)))
    mgr.wait_until_finished()
  with pytest.raises(ValueError, match="another training run"):
    posthoc.SnapshotRun(tmp_path)
  with pytest.warns(UserWarning, match="steps 30"):
    with posthoc.SnapshotRun(tmp_path, resume_from=states[20]) as again:
      assert again.identity == run.identity
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [10, 20]


@pytest.mark.orbax
def test_continuing_moves_every_newer_step_folder_so_a_manager_saves_again(
  tmp_path,
):
  # The recipe of snapshot_items: plain checkpoints every 50 steps in the
  # same directory, a snapshot every 100. Rolled back to 100, the manager
  # would see its own 150 and 250 and skip saving 150 and 200.
  states = _states(300, 50)
  with posthoc.SnapshotRun(tmp_path) as run, ocp.CheckpointManager(tmp_path) as mgr:
    for t in range(50, 301, 50):
      items = {"plain": ocp.args.StandardSave({"count": states[t].count})}
      if t % 100 == 0:
        items |= posthoc.snapshot_items(states[t], run)
      mgr.save(t, args=ocp.args.Composite(**items))
    mgr.wait_until_finished()
  with pytest.warns(UserWarning) as record:
    again = posthoc.SnapshotRun(tmp_path, resume_from=states[100])
  (warning,) = record
  for words in ["snapshots of steps 200, 300", "checkpoints) of steps 150, 250"]:
    assert words in str(warning.message), warning.message
  moved = tmp_path.parent / f"{tmp_path.name}.abandoned-after-100"
  assert _listing(moved) == ["150", "200", "250", "300"]
  with again, ocp.CheckpointManager(tmp_path) as mgr:
    assert mgr.latest_step() == 100
    for t in (150, 200):
      items = {"plain": ocp.args.StandardSave({"count": states[t].count})}
      if t % 100 == 0:
        items |= posthoc.snapshot_items(states[t], again)
      mgr.save(t, args=ocp.args.Composite(**items))
    mgr.wait_until_finished()
  assert [s.step for s in posthoc.load_snapshots(tmp_path)] == [100, 200]


@pytest.mark.parametrize("corrupt", ["not json {", '{"format": "optax_ema.posthoc/3"}'])
@pytest.mark.orbax
def test_corrupt_snapshot_metadata_is_an_error_naming_its_path(tmp_path, corrupt):
  states = _states(20, 10)
  _write(tmp_path, [states[10], states[20]])
  meta = tmp_path / "20" / "power_ema_meta" / "metadata"
  meta.write_text(corrupt)
  for call in (
    lambda: posthoc.load_snapshots(tmp_path),
    lambda: posthoc.SnapshotWriter(tmp_path, resume_from=20),
  ):
    with pytest.raises(ValueError, match="corrupt") as err:
      call()
    assert str(meta.parent) in str(err.value)


def test_every_failure_of_process_0_reaches_the_other_processes(tmp_path, monkeypatch):
  # The other processes wait in the broadcast: process 0 must get there with
  # its failure whatever it is, not raise before it.
  from optax_ema.posthoc import _run

  def fails(*args):
    raise RuntimeError("disk on fire")

  sent = []
  broadcast = _run._broadcast

  def recording(ok, run, message):
    sent.append((ok, message))
    return broadcast(ok, run, message)

  monkeypatch.setattr(_run, "_decide", fails)
  monkeypatch.setattr(_run, "_broadcast", recording)
  with pytest.raises(ValueError, match="RuntimeError: disk on fire"):
    posthoc.SnapshotRun(tmp_path)
  assert sent == [(False, "RuntimeError: disk on fire")]
  monkeypatch.undo()
  posthoc.SnapshotRun(tmp_path).close()  # the lock was released


# --- format optax_ema.posthoc/2 ------------------------------------------------------


@pytest.mark.orbax
def test_snapshots_of_format_2_still_load_and_reconstruct():
  snaps = posthoc.load_snapshots(FORMAT2)
  assert [s.step for s in snaps] == [10, 20, 30]
  assert [s.run for s in snaps] == [None, None, None]
  got = posthoc.reconstruct(FORMAT2, 0.10)
  np.testing.assert_allclose(got["w"], _power_average_of_steps(30, 0.10), rtol=1e-5)
  like = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  got = posthoc.reconstruct(FORMAT2, 0.05, step=20, like=like)
  np.testing.assert_allclose(got["w"], _power_average_of_steps(20, 0.05), rtol=1e-5)


@pytest.mark.orbax
def test_the_command_line_lists_format_2_as_a_run_without_identity(capsys):
  assert posthoc.main([str(FORMAT2), "--list"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[1] == "run: none (format optax_ema.posthoc/2)"


@pytest.mark.orbax
def test_a_directory_of_format_2_is_continued_only_when_asked(tmp_path):
  directory = tmp_path / "old"
  shutil.copytree(FORMAT2, directory)
  states = _states(40, 10)
  with pytest.raises(ValueError, match=r"a run without identity \(format"):
    posthoc.SnapshotWriter(directory)
  assert _write(directory, [states[40]], resume_from=30) is None  # adopts none
  snaps = posthoc.load_snapshots(directory)
  assert [s.step for s in snaps] == [10, 20, 30, 40]
  assert {s.run for s in snaps} == {None}
  # Mixed with a run that has an identity, it is refused.
  _write(tmp_path / "new", [states[10]])
  with pytest.raises(ValueError, match=r"a run without identity .* at steps 10, 20"):
    posthoc.load_snapshots([directory, tmp_path / "new"])
