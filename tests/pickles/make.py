"""Pickles of every state type, and how they were made.

Run as a script (``python tests/pickles/make.py``) at the commit before the
state types moved into ``optax_ema/_states.py``, it trained each
configuration of ``CONFIGS`` for ``STEPS`` steps and pickled the state (its
arrays as NumPy arrays). Those files are committed; the tests load them with
the current library and train on. Importing this module only defines the
configurations.
"""

import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ema
from optax_ema import schedules

ROOT = pathlib.Path(__file__).resolve().parent
STEPS = 3
PARAMS = {
  "w": jnp.arange(3.0),
  "b": jnp.ones(2, jnp.bfloat16),
  "n": jnp.asarray(4, jnp.int32),
}
GRADS = {
  "w": jnp.full(3, 0.5),
  "b": jnp.full(2, 0.25, jnp.bfloat16),
  "n": jnp.asarray(0, jnp.int32),
}
# name -> (the transformation, the name of its state type)
CONFIGS = {
  "moving_average": (
    lambda: optax_ema.moving_average(optax.sgd(0.1), 0.9),
    "MovingAverageState",
  ),
  "moving_average_several_debiased": (
    lambda: optax_ema.moving_average(
      optax.sgd(0.1),
      {"fast": 0.9, "slow": schedules.power(sigma_rel=0.1)},
      debias=True,
    ),
    "MovingAverageState",
  ),
  "moving_average_per_leaf": (
    lambda: optax_ema.moving_average(
      optax.sgd(0.1),
      schedules.per_leaf({"w": 0.9, "b": 0.5, "n": 0.9}),
      debias=True,
    ),
    "MovingAverageState",
  ),
  "power_ema": (
    lambda: optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.1)),
    "PowerEmaState",
  ),
  "swa": (
    lambda: optax_ema.swa(optax.sgd(0.1), start_averaging=1, average_period=2),
    "SWAState",
  ),
}


def main():
  for name, (make, _) in CONFIGS.items():
    tx = make()
    state, params = tx.init(PARAMS), PARAMS
    for _ in range(STEPS):
      updates, state = tx.update(GRADS, state, params)
      params = optax.apply_updates(params, updates)
    state = jax.tree.map(np.asarray, state)
    (ROOT / f"{name}.pkl").write_bytes(pickle.dumps(state, protocol=4))


if __name__ == "__main__":
  main()
