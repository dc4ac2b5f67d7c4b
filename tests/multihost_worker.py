"""One process of the multi-host test (tests/test_multihost.py).

Run as ``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``:
each process gets 2 CPU devices, joins the others through
``jax.distributed.initialize`` on 127.0.0.1 (gloo CPU collectives), trains a
few steps of a model sharded over a (data, model) mesh of all processes'
devices with ``optax_ema.moving_average``, checks that every average keeps
its param's sharding, and writes the gathered averages to ``OUT.npz``.

Importing this module does nothing but define the problem, so the test can
compute the single-process reference with the same code.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema

import processes

STEPS = 3
DEVICES_PER_PROCESS = 2
SPECS = {"w1": P("data", "model"), "b1": P("model"), "w2": P("model")}


def problem():
  """The initial params and the batch, as NumPy arrays."""
  rng = np.random.default_rng(7)
  params = {
    "w1": (rng.normal(size=(4, 8)) * 0.5).astype(np.float32),
    "b1": np.zeros(8, np.float32),
    "w2": (rng.normal(size=(8, 2)) * 0.5).astype(np.float32),
  }
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = np.tanh(x[:, :2]).astype(np.float32)
  return params, x, y


def make_tx():
  return optax_ema.moving_average(optax.adam(0.05), average_decay=0.8)


def make_step(tx):
  def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def reference_run():
  """The single-process, unsharded run: the averages as NumPy arrays."""
  params, x, y = problem()
  params = jax.tree.map(jnp.asarray, params)
  tx = make_tx()
  state = tx.init(params)
  step = make_step(tx)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return {k: np.asarray(v) for k, v in state.average.items()}


def _global_array(value, sharding):
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _train_and_save(out_path):
  n = jax.device_count()
  assert n == jax.process_count() * DEVICES_PER_PROCESS, jax.devices()
  assert jax.local_device_count() == DEVICES_PER_PROCESS
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()).reshape(2, n // 2), ("data", "model")
  )
  shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
  params_np, x_np, y_np = problem()
  params = {k: _global_array(v, shardings[k]) for k, v in params_np.items()}
  batch = NamedSharding(mesh, P("data"))
  x, y = _global_array(x_np, batch), _global_array(y_np, batch)

  tx = make_tx()
  state = jax.jit(tx.init)(params)
  step = make_step(tx)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
    for k, sharding in shardings.items():
      got = state.average[k].sharding
      assert got == sharding, f"average {k} has sharding {got}, expected {sharding}"

  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(state.average, tiled=True)
  np.savez(
    out_path,
    count=np.asarray(state.count.addressable_data(0)),  # replicated
    num_devices=np.asarray(n),
    **{k: np.asarray(v) for k, v in gathered.items()},
  )


if __name__ == "__main__":
  processes.join(sys.argv[1:], DEVICES_PER_PROCESS, _train_and_save)
