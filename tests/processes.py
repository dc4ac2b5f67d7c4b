"""Local multi-process runs for the multi-host tests.

``launch`` starts one Python process per ``jax.distributed`` process on
127.0.0.1 and waits for all of them within a deadline, killing any that are
left; ``join`` is the worker side: it joins the others with gloo CPU
collectives, runs the body, and exits at once on an error (a graceful
shutdown would wait for the processes that are still running).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(worker: Path, extra_args: Sequence[Sequence[str]], timeout_s: float):
  """Runs ``worker PROCESS_ID NUM_PROCESSES PORT *extra_args[i]`` per process.

  Fails with the tail of a process's output if any exits non-zero, and with
  a timeout message if they do not all finish within ``timeout_s``.
  """
  num_processes = len(extra_args)
  port = _free_port()
  # The workers choose their own platform and device count.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  procs = []
  try:
    for i, args in enumerate(extra_args):
      cmd = [sys.executable, str(worker), str(i), str(num_processes), str(port)]
      procs.append(
        subprocess.Popen(
          [*cmd, *map(str, args)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
        )
      )
    deadline = time.monotonic() + timeout_s
    logs = []
    for proc in procs:
      try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        raise AssertionError(
          f"{worker.name}: processes did not finish within {timeout_s} s"
        ) from None
      logs.append(out)
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
      assert proc.returncode == 0, (
        f"{worker.name} process {i} exited with {proc.returncode}:\n{log[-3000:]}"
      )
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
      if proc.stdout is not None:
        proc.stdout.close()


def join(argv: Sequence[str], devices_per_process: int, body: Callable[..., None]):
  """Worker side of ``launch``: joins the processes, then ``body(*rest)``."""
  import jax

  process_id, num_processes, port, *rest = argv
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices_per_process)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=int(num_processes),
    process_id=int(process_id),
    initialization_timeout=60,
  )
  try:
    body(*rest)
  except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  jax.distributed.shutdown()
