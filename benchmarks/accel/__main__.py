"""Command line: ``python -m benchmarks.accel --matrix quick``.

Writes ``<out>.json`` (every job's figures, versions, flags, times) after
each job, so that a long run can be followed and resumed (``--resume``), and
``<out>.md`` (the tables) and ``<out>.txt`` (one line per job) at the end.
"""

import os

# Before jax starts: deviceless GPU targets need no GPU, libtpu must not query
# a TPU VM's metadata (or fight another process over its lockfile), and the
# ``cpu`` targets need eight devices.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  import jax

  jax.config.update("jax_num_cpu_devices", 8)

from .cli import main

if __name__ == "__main__":
  main()
