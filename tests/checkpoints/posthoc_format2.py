"""Writes tests/checkpoints/posthoc_format2: snapshots in format optax_ema.posthoc/2.

Run with optax_ema at 1b4292a (before snapshots carried a run identity):
``python tests/checkpoints/posthoc_format2.py tests/checkpoints/posthoc_format2``.
power_ema(sgd(1), sigma_rels=(0.05, 0.10)) on {"w": zeros(3)} with gradient -1
(the parameter is t after t steps), float32 snapshots at steps 10, 20 and 30.
Importing this module writes nothing.
"""

import sys

import jax.numpy as jnp
import numpy as np
import optax

import optax_ema
from optax_ema import posthoc

STEPS = (10, 20, 30)


def write(directory):
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  with posthoc.SnapshotWriter(directory, every=10, dtype=np.float32) as writer:
    for t in range(1, STEPS[-1] + 1):
      updates, state = tx.update({"w": -jnp.ones(3)}, state, params)
      params = optax.apply_updates(params, updates)
      writer(state, t)


if __name__ == "__main__":
  write(sys.argv[1])
