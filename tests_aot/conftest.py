"""Compile-only tests for accelerators, run in the environment of the `aot` extra.

libtpu prints start-up errors in every process that imports it unless told
that no TPU metadata server is there; the CUDA plugin refuses to load
without a GPU unless its constraint check is skipped. Both are set before
either plugin starts (they start on the first compile for their platform).
"""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
