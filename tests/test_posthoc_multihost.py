"""Post-hoc EMA across two local processes x 2 CPU devices (jax.distributed).

Both processes train a power_ema whose arrays span them, save snapshots to
one directory (each its own shards) and reconstruct into another sharding
(tests/posthoc_multihost_worker.py). The result must equal the
single-process, unsharded run. Bounded by a timeout; the processes are always
killed.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import posthoc_multihost_worker as worker

from optax_ema import posthoc

NUM_PROCESSES = 2
TIMEOUT_S = 120
WORKER = pathlib.Path(__file__).with_name("posthoc_multihost_worker.py")


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(directory, outs):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  procs = []
  try:
    for i in range(NUM_PROCESSES):
      cmd = [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)]
      procs.append(
        subprocess.Popen(
          [*cmd, str(directory), str(outs[i])],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
        )
      )
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    for proc in procs:
      try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        raise AssertionError(
          f"multi-host workers did not finish within {TIMEOUT_S} s"
        ) from None
      logs.append(out)
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
      assert proc.returncode == 0, (
        f"process {i} exited with {proc.returncode}:\n{log[-3000:]}"
      )
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
      if proc.stdout is not None:
        proc.stdout.close()


def test_two_processes_reconstruct_like_one_process(tmp_path):
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  _run_workers(tmp_path / "shared", outs)
  want = worker.reference_run(tmp_path / "single")
  params0, _, _ = worker.problem()
  snaps = posthoc.load_snapshots(tmp_path / "shared")
  assert [s.step for s in snaps] == list(range(worker.EVERY, worker.STEPS + 1, 4))
  from_files = posthoc.reconstruct(tmp_path / "shared", worker.TARGET_SIGMA_REL)
  results = [np.load(path) for path in outs]
  for k, v in want.items():
    assert not np.allclose(v, params0[k])  # training moved it
    # The snapshots both processes wrote, read in this single process:
    np.testing.assert_allclose(from_files[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for i, result in enumerate(results):
      assert int(result["num_devices"]) == 4
      np.testing.assert_allclose(result[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{i} {k}")
    np.testing.assert_array_equal(results[0][k], results[1][k])
