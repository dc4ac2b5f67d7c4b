"""Two local processes x 2 CPU devices joined by jax.distributed.

The worker (tests/multihost_worker.py) trains a model sharded over all four
devices; the averages gathered in each process must equal the
single-process, unsharded run. Bounded by a timeout; the processes are
always killed.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

import multihost_worker

NUM_PROCESSES = 2
TIMEOUT_S = 90
WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  procs = []
  try:
    for i in range(NUM_PROCESSES):
      cmd = [
        sys.executable,
        str(WORKER),
        str(i),
        str(NUM_PROCESSES),
        str(port),
        str(outs[i]),
      ]
      procs.append(
        subprocess.Popen(
          cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
      )
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    for proc in procs:
      remaining = max(1.0, deadline - time.monotonic())
      try:
        out, _ = proc.communicate(timeout=remaining)
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
      for stream in (proc.stdout, proc.stderr):
        if stream is not None:
          stream.close()
  return [np.load(path) for path in outs]


def test_two_processes_average_like_one_process(tmp_path):
  results = _run_workers(tmp_path)
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
