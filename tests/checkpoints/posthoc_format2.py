"""Writes tests/checkpoints/posthoc_format2: snapshots in format optax_ema.posthoc/2.

Run with optax_ema at 1b4292a (before snapshots carried a run identity):
`python tests/checkpoints/posthoc_format2.py tests/checkpoints/posthoc_format2`.
"""

import sys

import jax.numpy as jnp
import numpy as np
import optax

import optax_ema
from optax_ema import posthoc

tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
params = {"w": jnp.zeros(3)}
state = tx.init(params)
with posthoc.SnapshotWriter(sys.argv[1], every=10, dtype=np.float32) as writer:
  for t in range(1, 31):
    updates, state = tx.update({"w": -jnp.ones(3)}, state, params)
    params = optax.apply_updates(params, updates)
    writer(state, t)
