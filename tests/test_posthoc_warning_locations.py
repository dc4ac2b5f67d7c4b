"""The post-hoc warnings point at the line of the user's code.

As in ``test_warning_locations.py``, each post-hoc entry point that can warn
is called from this file, and the warning's ``filename`` must be this file.
These write Orbax snapshots (the ``orbax`` extra).
"""

import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import posthoc

pytestmark = pytest.mark.orbax

PARAMS = {"w": jnp.ones(3)}


def _one(record, category=UserWarning):
  """The one warning of ``category`` in ``record``."""
  (found,) = [r for r in record if issubclass(r.category, category)]
  return found


def _snapshots(directory, counts, every=10):
  """A power_ema run of ``max(counts)`` steps, saving at ``counts``."""
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.10))
  params, state = PARAMS, tx.init(PARAMS)
  states = {}
  with posthoc.SnapshotWriter(directory, dtype=np.float32) as writer:
    for t in range(1, max(counts) + 1):
      updates, state = tx.update({"w": -jnp.ones(3) * t}, state, params)
      params = optax.apply_updates(params, updates)
      states[t] = state
      if t in counts:
        writer.save(state)
  return states


@pytest.mark.parametrize("how", ["SnapshotWriter", "SnapshotRun", "save_snapshot"])
def test_continuing_a_run_warns_at_the_call_that_opens_it(tmp_path, how):
  states = _snapshots(tmp_path, [10, 20])
  with pytest.warns(UserWarning, match="Continuing") as record:
    if how == "SnapshotWriter":
      posthoc.SnapshotWriter(tmp_path, resume_from=states[10]).close()
    elif how == "SnapshotRun":
      posthoc.SnapshotRun(tmp_path, resume_from=states[10]).close()
    else:
      posthoc.save_snapshot(tmp_path, states[15], resume_from=states[10])
      posthoc.wait_until_finished(tmp_path)
  assert _one(record).filename == __file__


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("snaps")
  _snapshots(directory, [20, 40])
  return directory


@pytest.mark.parametrize("how", ["reconstruction_weights", "reconstruct"])
def test_a_poor_fit_warns_at_the_reconstructing_call(snapshot_dir, how):
  call = getattr(posthoc, how)
  with pytest.warns(UserWarning, match="fit_error") as record:
    call(snapshot_dir, sigma_rel=0.01)
  assert [r.filename for r in record] == [__file__] * len(record)


def test_a_sweep_warns_once_at_its_call(snapshot_dir):
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    posthoc.sweep(snapshot_dir, [0.01, 0.07], lambda p: p["w"][0])
  (warning,) = record
  assert "1 of 2 widths" in str(warning.message)
  assert warning.filename == __file__
