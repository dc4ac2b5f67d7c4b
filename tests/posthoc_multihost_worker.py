"""One process of the post-hoc multi-host test (tests/test_posthoc_multihost.py).

Run as ``python posthoc_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DIR
OUT.npz``: each process gets 2 CPU devices and joins the others through
``jax.distributed.initialize`` on 127.0.0.1 (gloo CPU collectives). Together
they train ``power_ema(adam)`` on parameters sharded over a (data, model)
mesh whose ``data`` axis spans the processes (no array is fully addressable
in any process), save snapshots to ``DIR`` (every process its own shards),
reconstruct ``TARGET_SIGMA_REL`` into another sharding, check the result's
shardings, and write the gathered result to ``OUT.npz`` with the run identity
the process's writer recorded (agreed by all processes). Then process 1
tries a new run in the directory, which process 0 refuses for all of them.

Importing this module only defines the problem, so the test computes the
single-process run with the same code.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema
from optax_ema import posthoc

import processes

STEPS = 12
EVERY = 4
TARGET_SIGMA_REL = 0.07
DEVICES_PER_PROCESS = 2
TRAIN_SPECS = {"w1": P("data", "model"), "b1": P("data"), "w2": P("data", None)}
TARGET_SPECS = {"w1": P("model", "data"), "b1": P("model"), "w2": P(None, "data")}


def problem():
  """The initial params and the batch, as NumPy arrays."""
  rng = np.random.default_rng(11)
  params = {
    "w1": (rng.normal(size=(4, 8)) * 0.5).astype(np.float32),
    "b1": np.zeros(8, np.float32) + 0.5,
    "w2": (rng.normal(size=(8, 2)) * 0.5).astype(np.float32),
  }
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = np.tanh(x[:, :2]).astype(np.float32)
  return params, x, y


def make_tx():
  return optax_ema.power_ema(optax.adam(0.05), sigma_rels=(0.05, 0.10))


def make_step(tx):
  def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def train(params, x, y, directory):
  """Trains STEPS steps, saving float32 snapshots every EVERY steps.

  Returns the params, the state and the run identity of the snapshots.
  """
  tx = make_tx()
  state = jax.jit(tx.init)(params)
  step = make_step(tx)
  with posthoc.SnapshotWriter(directory, every=EVERY, dtype=np.float32) as writer:
    for t in range(1, STEPS + 1):
      params, state = step(params, state, x, y)
      writer(state, t)
  return params, state, writer.run.identity


def reference_run(directory):
  """The single-process, unsharded run: (the reconstruction, the run)."""
  params, x, y = problem()
  *_, run = train(jax.tree.map(jnp.asarray, params), x, y, directory)
  return posthoc.reconstruct(directory, TARGET_SIGMA_REL), run


def _global_array(value, sharding):
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _run(directory, out_path):
  n = jax.device_count()
  assert n == jax.process_count() * DEVICES_PER_PROCESS, jax.devices()
  devices = np.array(jax.devices()).reshape(jax.process_count(), -1)
  for row in devices:  # each row of the mesh is one process's devices
    assert len({d.process_index for d in row}) == 1, devices
  mesh = jax.sharding.Mesh(devices, ("data", "model"))
  params_np, x_np, y_np = problem()
  params = {
    k: _global_array(v, NamedSharding(mesh, TRAIN_SPECS[k]))
    for k, v in params_np.items()
  }
  batch = NamedSharding(mesh, P("data"))
  x, y = _global_array(x_np, batch), _global_array(y_np, batch)
  _, state, run = train(params, x, y, directory)
  for profile in state.averages.values():
    for k, leaf in profile.items():
      assert not leaf.is_fully_addressable, k

  like = {
    k: jax.ShapeDtypeStruct(
      v.shape, v.dtype, sharding=NamedSharding(mesh, TARGET_SPECS[k])
    )
    for k, v in params_np.items()
  }
  result = posthoc.reconstruct(directory, TARGET_SIGMA_REL, like=like)
  for k, leaf in result.items():
    assert leaf.sharding == like[k].sharding, (k, leaf.sharding)
    assert not leaf.is_fully_addressable, k

  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(result, tiled=True)
  # Every process is refused a new run here, though only process 0 reads the
  # directory and holds the lock: it broadcasts its decision.
  refused = ""
  try:
    posthoc.SnapshotWriter(directory)
  except ValueError as err:
    refused = str(err)
  np.savez(
    out_path,
    num_devices=np.asarray(n),
    run=np.asarray(run),
    refused=np.asarray(refused),
    **{k: np.asarray(v) for k, v in gathered.items()},
  )


if __name__ == "__main__":
  processes.join(sys.argv[1:], DEVICES_PER_PROCESS, _run)
