"""Orbax checkpoints written by optax_ema 0.1.0, and how they were made.

Run as a script (``python tests/checkpoints/v0_1_0.py``) with optax_ema 0.1.0
installed, it trains each configuration of ``CONFIGS`` for ``SAVED_AT``
steps, saves ``{"params", "opt_state"}`` with an
``orbax.checkpoint.CheckpointManager`` under ``tests/checkpoints/v0_1_0/NAME``
and records in ``NAME.npz`` what ``CONTINUED`` further steps of the same run
reach (params, averages, count). Those files are committed; the tests
restore them with the current library, continue training and compare.

Importing this module only defines the configurations, the data and the
training step, so that the tests rebuild exactly the same run.
"""

import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ema
from optax_ema import schedules

ROOT = pathlib.Path(__file__).resolve().parent / "v0_1_0"
SAVED_AT = 5
CONTINUED = 4

_RNG = np.random.default_rng(11)
X = _RNG.normal(size=(32, 4)).astype(np.float32)
Y = np.tanh(X @ _RNG.normal(size=(4, 3))).astype(np.float32)


def params0():
  """The initial parameters: float32 dense layer and a bfloat16 scale."""
  rng = np.random.default_rng(5)
  return {
    "dense": {
      "w": jnp.asarray(rng.normal(size=(4, 3)) * 0.5, jnp.float32),
      "b": jnp.zeros(3, jnp.float32),
    },
    "scale": jnp.ones(3, jnp.bfloat16),
  }


CONFIGS = {
  "plain": lambda: optax_ema.moving_average(optax.adam(0.05), 0.9),
  "several_debias": lambda: optax_ema.moving_average(
    optax.adam(0.05), {"fast": 0.6, "slow": 0.95}, debias=True
  ),
  "masked": lambda: optax_ema.moving_average(
    optax.sgd(0.1, momentum=0.9),
    0.8,
    mask={"dense": {"w": True, "b": False}, "scale": True},
  ),
  "update_every_schedule": lambda: optax_ema.moving_average(
    optax.adam(0.05), schedules.warmup(0.99, power=0.75), update_every=2
  ),
  "power_ema": lambda: optax_ema.power_ema(optax.adam(0.05), sigma_rels=(0.05, 0.10)),
  "swa": lambda: optax_ema.swa(optax.sgd(0.1), start_averaging=1, average_period=2),
}

# The averages each configuration keeps (`which=` values of averaged_params).
WHICH = {
  "plain": [None],
  "several_debias": ["fast", "slow"],
  "masked": [None],
  "update_every_schedule": [None],
  "power_ema": [0.05, 0.10],
  "swa": [None],
}


def make_step(tx):
  """A jitted training step of the two-layer regression problem."""

  def loss(p):
    h = jnp.tanh(X @ p["dense"]["w"] + p["dense"]["b"])
    return jnp.mean((h * p["scale"].astype(jnp.float32) - Y) ** 2)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def observe(name, params, opt_state):
  """The values recorded at the end of the continued run, as a flat dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out["params" + jax.tree_util.keystr(path)] = np.asarray(leaf, np.float32)
  for which in WHICH[name]:
    avg = optax_ema.averaged_params(opt_state, params, which=which)
    for path, leaf in jax.tree_util.tree_flatten_with_path(avg)[0]:
      key = f"average[{which!r}]" + jax.tree_util.keystr(path)
      out[key] = np.asarray(leaf, np.float32)
  out["count"] = np.asarray(optax_ema.diagnostics(opt_state, params)["count"])
  return out


def _write(name):
  import orbax.checkpoint as ocp

  tx = CONFIGS[name]()
  step = make_step(tx)
  params = params0()
  opt_state = tx.init(params)
  for _ in range(SAVED_AT):
    params, opt_state = step(params, opt_state)
  directory = ROOT / name
  shutil.rmtree(directory, ignore_errors=True)
  with ocp.CheckpointManager(directory) as manager:
    manager.save(
      SAVED_AT,
      args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
    )
    manager.wait_until_finished()
  for _ in range(CONTINUED):
    params, opt_state = step(params, opt_state)
  np.savez(ROOT / f"{name}.npz", **observe(name, params, opt_state))


if __name__ == "__main__":
  if optax_ema.__version__ != "0.1.0":
    sys.exit(
      f"these fixtures are made with optax_ema 0.1.0, not {optax_ema.__version__}"
    )
  ROOT.mkdir(exist_ok=True)
  for name in CONFIGS:
    _write(name)
    print("wrote", name)
