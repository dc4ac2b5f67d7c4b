"""The cost of averaging parameters: optax_ema against every peer and the floor.

An EMA step is pure memory traffic: read the new parameters and the average,
write the average, 12 bytes per float32 parameter. This script measures, on
transformer-like float32 parameter trees with fixed random gradients (the
forward/backward pass is not measured), the time per training step of:

- ``optax.adam`` alone, jitted with parameters and state donated (the
  baseline), and ``optax_ema.moving_average(optax.adam)`` (also with
  ``update_every=10``, with two decays, and with the averages offloaded to
  host memory, ``offload=True``, when the installed optax_ema has them; on a
  CPU both memories are the same RAM, so the offload rows measure the
  bookkeeping, not a host link);
- a hand-written EMA fused into the same jitted step, and one in a second
  jitted call; ``moving_average(adam)`` without donation (against adam without
  donation); adam / ``moving_average(adam)`` over one flattened parameter
  vector (the fusion experiment);
- Flax NNX ``nnx.Optimizer`` with and without ``nnx.EMA`` in ``nnx.jit``;
- Keras 3 (JAX backend) ``Adam`` with and without ``use_ema=True``, through
  the stateless API inside ``jax.jit``;
- the floor: one jitted, donated ``e + (1 - d) * (p - e)`` over one flat array
  of the same total size, and STREAM-like scale (``b = s * a``) and triad
  (``a = b + s * c``) bandwidths.

Every row is first checked against a NumPy EMA of its own parameter
trajectory (same decay, a few steps; at the smallest size by default, at every
size with ``--check-sizes all``), so the table compares like with like. Rows
are then timed interleaved: each of ``--rounds`` rounds visits every row (in
a rotated order), re-initialises its state (so allocation luck is sampled
too), runs one untimed step and times ``--steps`` steps one by one
(``block_until_ready`` after each, host transfers disallowed, retraces
counted). Peak memory comes from a fresh subprocess per row (process peak RSS,
``VmHWM``, after init and 3 steps; at the largest size by default, see
``--memory-sizes``) and from XLA's compiled memory analysis of the step, with
the number of array-sized loops the compiled step runs.

Columns: median ms/step [25th-75th percentile], the EMA overhead over the same
framework's optimizer alone, that overhead divided by the floor, peak RSS, and
XLA's argument / output / alias / temp bytes of the compiled step.

Run (``pip install -e .[bench]``; about 9 minutes on a 2-core CPU box)::

  python benchmarks/bench_ema.py                   # full run, writes JSON
  python benchmarks/bench_ema.py --quick           # small smoke configuration
  python benchmarks/bench_ema.py --sizes 1M --rounds 3 --steps 50

The JSON (``--out``, default ``benchmarks/results/bench_ema.json``) holds the
raw samples, the per-row summaries and the machine information; the printed
table is also written next to it as ``.txt`` and as Markdown (``.md``, the
performance guide's tables), with the performance targets evaluated.

This file is the entry point; the code is in ``benchmarks/ema/``, a module
per concern (see its ``__init__``). Every row is checked with the test
suite's NumPy EMA (``tests/helpers.py``), so the benchmark needs the
repository, not only the installed package.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is first imported
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # run as a script, it is already there
  sys.path.insert(0, _HERE)

from ema.check import check_row  # noqa: E402
from ema.cli import main  # noqa: E402
from ema.cli import run  # noqa: E402
from ema.rows import all_rows  # noqa: E402
from ema.runner import Row  # noqa: E402
from ema.runner import Runner  # noqa: E402
from ema.timing import time_rows  # noqa: E402
from ema.trees import SIZES  # noqa: E402
from ema.trees import num_leaves  # noqa: E402
from ema.trees import num_params  # noqa: E402

__all__ = [
  "SIZES",
  "Row",
  "Runner",
  "all_rows",
  "check_row",
  "main",
  "num_leaves",
  "num_params",
  "run",
  "time_rows",
]

if __name__ == "__main__":
  main()
