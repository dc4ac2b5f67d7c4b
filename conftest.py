"""Test-wide JAX configuration: eight fake CPU devices.

Set before any JAX backend starts, so the multi-device tests (pmap, sharded
jit) see a 2x4 mesh on a CPU-only machine; single-device tests are unaffected
(they run on device 0).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
