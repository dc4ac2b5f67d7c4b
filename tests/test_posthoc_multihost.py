"""Post-hoc EMA across two local processes x 2 CPU devices (jax.distributed).

Both processes train a power_ema whose arrays span them, save snapshots to
one directory (each its own shards) and reconstruct into another sharding
(tests/posthoc_multihost_worker.py). The result must equal the
single-process, unsharded run, and the snapshots of both processes carry
one run identity. Bounded by a timeout; the processes are always killed.
"""

import pathlib

import numpy as np
import pytest

from optax_ema import posthoc

import posthoc_multihost_worker as worker
import processes

pytestmark = [pytest.mark.multiprocess, pytest.mark.orbax]

NUM_PROCESSES = 2
TIMEOUT_S = 120
WORKER = pathlib.Path(__file__).with_name("posthoc_multihost_worker.py")


def test_two_processes_reconstruct_like_one_process(tmp_path):
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  processes.launch(WORKER, [[tmp_path / "shared", out] for out in outs], TIMEOUT_S)
  want, single_run = worker.reference_run(tmp_path / "single")
  params0, _, _ = worker.problem()
  snaps = posthoc.load_snapshots(tmp_path / "shared")
  assert [s.step for s in snaps] == list(range(worker.EVERY, worker.STEPS + 1, 4))
  from_files = posthoc.reconstruct(tmp_path / "shared", worker.TARGET_SIGMA_REL)
  results = [np.load(path) for path in outs]
  # One run: both processes' writers recorded the identity process 0 drew.
  runs = {str(result["run"]) for result in results}
  assert runs == {s.run for s in snaps} and len(runs.pop()) == 32
  assert single_run not in {s.run for s in snaps}  # another run
  for result in results:  # process 0's refusal, raised in every process
    assert "another training run" in str(result["refused"])
  for k, v in want.items():
    assert not np.allclose(v, params0[k])  # training moved it
    # The snapshots both processes wrote, read in this single process:
    np.testing.assert_allclose(from_files[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for i, result in enumerate(results):
      assert int(result["num_devices"]) == 4
      np.testing.assert_allclose(result[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{i} {k}")
    np.testing.assert_array_equal(results[0][k], results[1][k])
