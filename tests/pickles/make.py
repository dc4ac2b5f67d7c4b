"""Pickles of each state type, as written by the commit before the layouts moved."""
import pickle, pathlib
import jax.numpy as jnp, numpy as np, optax, optax_ema
from optax_ema import schedules

params = {"w": jnp.arange(3.0), "b": jnp.ones(2, jnp.bfloat16), "n": jnp.asarray(4, jnp.int32)}
grads = {"w": jnp.full(3, 0.5), "b": jnp.full(2, 0.25, jnp.bfloat16), "n": jnp.asarray(0, jnp.int32)}
txs = {
  "moving_average": optax_ema.moving_average(optax.sgd(0.1), 0.9),
  "moving_average_several_debiased": optax_ema.moving_average(optax.sgd(0.1), {"fast": 0.9, "slow": schedules.power(sigma_rel=0.1)}, debias=True),
  "moving_average_per_leaf": optax_ema.moving_average(optax.sgd(0.1), schedules.per_leaf({"w": 0.9, "b": 0.5, "n": 0.9}), debias=True),
  "power_ema": optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.1)),
  "swa": optax_ema.swa(optax.sgd(0.1), start_averaging=1, average_period=2),
}
out = pathlib.Path("tests/pickles")
for name, tx in txs.items():
  state = tx.init(params)
  p = params
  for _ in range(3):
    u, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, u)
  state = __import__("jax").tree.map(np.asarray, state)
  (out / f"{name}.pkl").write_bytes(pickle.dumps(state, protocol=4))
  print(name, type(state).__module__, type(state).__name__)
