"""Two local processes x 2 CPU devices joined by jax.distributed.

The worker (tests/multihost_worker.py) trains a model sharded over all four
devices; the averages gathered in each process must equal the
single-process, unsharded run. Bounded by a timeout; the processes are
always killed.
"""

import pathlib

import numpy as np
import pytest

import multihost_worker
import processes

pytestmark = pytest.mark.multiprocess

NUM_PROCESSES = 2
TIMEOUT_S = 90
WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def test_two_processes_average_like_one_process(tmp_path):
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  processes.launch(WORKER, [[out] for out in outs], TIMEOUT_S)
  results = [np.load(path) for path in outs]
  want = multihost_worker.reference_run()
  params0, _, _ = multihost_worker.problem()
  for i, result in enumerate(results):
    assert int(result["num_devices"]) == 4, i
    np.testing.assert_array_equal(result["count"], multihost_worker.STEPS)
    for k, v in want.items():
      np.testing.assert_allclose(result[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{i} {k}")
      assert not np.allclose(result[k], params0[k])
  for k in want:
    np.testing.assert_array_equal(results[0][k], results[1][k])
