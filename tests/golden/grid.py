"""A grid of averaging configurations whose outputs are pinned in a golden file.

``python tests/golden/grid.py`` runs every configuration of ``CONFIGS`` for
``STEPS`` jitted steps on the same parameter tree (float32, bfloat16, int32,
a PRNG key and a ``None`` leaf) with fixed updates, and writes what each step
produced to ``golden.npz`` next to this file: the stored averages leaf by
leaf, the count and the averaged parameters. The committed file was written
by optax_ema 0.1.0, before the package was rebuilt around one averaging
engine; ``tests/test_golden.py`` replays the grid with the current code and
compares.

Importing this module only defines the grid and the replay.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ema
from optax_ema import schedules

GOLDEN = pathlib.Path(__file__).with_name("golden.npz")
STEPS = 12
NAN_STEP = 5  # the step of `skip_nonfinite` configurations whose update is NaN

_PER_LEAF = {"w": 0.5, "b": 0.9, "h": 0.8, "i": 0.9, "k": 0.9, "n": 0.9}
_HALF = {"w": True, "b": False, "h": True, "i": True, "k": False, "n": True}


def _ma(average_decay, **kwargs):
  return lambda: optax_ema.moving_average(optax.identity(), average_decay, **kwargs)


def _matrix_mask(params):
  return jax.tree.map(lambda x: jnp.ndim(x) != 1, params)


CONFIGS = {
  "plain": _ma(0.9),
  "before_update": _ma(0.9, sequential_update=False),
  "num_updates": _ma(0.99, num_updates=3),
  "start_step": _ma(0.9, start_step=4),
  "dynamic_decay": _ma(0.99, dynamic_decay=True),
  "tfa_all_knobs": _ma(0.99, num_updates=20, start_step=2, dynamic_decay=True),
  "warmup": _ma(schedules.warmup(0.999, power=0.75)),
  "tf_ramp": _ma(schedules.tf_ramp(0.99)),
  "half_life": _ma(schedules.half_life(5)),
  "power_schedule": _ma(schedules.power(sigma_rel=0.1)),
  "optax_schedule": _ma(optax.linear_schedule(0.5, 0.95, 10)),
  "schedule_start_step": _ma(schedules.warmup(0.99), start_step=3, num_updates=5),
  "several_tuple": _ma((0.5, 0.9)),
  "several_dict": _ma({"a": 0.5, "b": schedules.warmup(0.99)}),
  "per_leaf": _ma(schedules.per_leaf(_PER_LEAF)),
  "debias": _ma(0.9, debias=True),
  "debias_schedule": _ma(schedules.warmup(0.99), debias=True),
  "debias_per_leaf": _ma(schedules.per_leaf(_PER_LEAF), debias=True),
  "update_every": _ma(0.9, update_every=3),
  "update_every_debias_schedule": _ma(
    schedules.warmup(0.99), update_every=2, debias=True
  ),
  "several_debias_update_every": _ma((0.5, 0.9), debias=True, update_every=2),
  "bf16_stochastic": _ma(0.99, ema_dtype=jnp.bfloat16, stochastic_rounding=True),
  "bf16_nearest": _ma(0.9, ema_dtype=jnp.bfloat16, stochastic_rounding=False),
  "f16_storage": _ma(0.9, ema_dtype=jnp.float16, stochastic_rounding=False),
  "mask_dict": _ma(0.9, mask=_HALF),
  "mask_callable": _ma(0.9, mask=_matrix_mask),
  "mask_several_debias_update_every": _ma(
    {"a": 0.6, "b": schedules.per_leaf({**_PER_LEAF, "w": 0.95})},
    mask=_HALF,
    debias=True,
    update_every=2,
  ),
  "skip_nonfinite": _ma(0.9, skip_nonfinite=True),
  "skip_nonfinite_several": _ma((0.5, 0.9), skip_nonfinite=True, debias=True),
  "adam_inner": lambda: optax_ema.moving_average(
    optax.masked(optax.adam(0.1), {**_HALF, "b": True, "i": False}), 0.8
  ),
  "power_ema": lambda: optax_ema.power_ema(optax.identity(), (0.05, 0.1)),
  "power_ema_masked": lambda: optax_ema.power_ema(
    optax.identity(), (0.05, 0.1, 0.2), mask=_HALF
  ),
  "power_ema_f32_storage": lambda: optax_ema.power_ema(
    optax.identity(), (0.1,), ema_dtype=jnp.float32
  ),
  "swa": lambda: optax_ema.swa(optax.identity(), start_averaging=2, average_period=3),
}

# The `which=` values to read each configuration's averages with.
WHICH = {
  "several_tuple": [0, 1],
  "several_dict": ["a", "b"],
  "several_debias_update_every": [0, 1],
  "mask_several_debias_update_every": ["a", "b"],
  "skip_nonfinite_several": [0, 1],
  "power_ema": [0.05, 0.1],
  "power_ema_masked": [0.05, 0.1, 0.2],
}


def params0():
  rng = np.random.default_rng(3)
  return {
    "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=4), jnp.float32),
    "h": jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.bfloat16),
    "i": jnp.array([3, -1], jnp.int32),
    "k": jax.random.key(7),
    "n": None,
  }


def updates_at(step, skip_nonfinite):
  """The updates fed to the transformation at ``step`` (1-based)."""
  rng = np.random.default_rng(100 + step)
  w = rng.normal(size=(3, 4)).astype(np.float32) * 0.3
  if skip_nonfinite and step == NAN_STEP:
    w[1, 2] = np.nan
  return {
    "w": jnp.asarray(w),
    "b": jnp.asarray(rng.normal(size=4) * 0.3, jnp.float32),
    "h": jnp.asarray(rng.normal(size=5) * 0.05, jnp.bfloat16),
    "i": jnp.array([1, step], jnp.int32),
    "k": np.zeros((), jax.dtypes.float0),
    "n": None,
  }


def _apply(params, updates, step):
  """The training loop's own parameter update; a non-finite update is skipped."""
  finite = all(
    bool(jnp.all(jnp.isfinite(u)))
    for u in jax.tree.leaves(updates)
    if jnp.issubdtype(u.dtype, jnp.inexact)
  )
  if not finite:
    return {**params, "k": jax.random.fold_in(params["k"], step)}
  new = {k: params[k] + updates[k] for k in ("w", "b", "h", "i")}
  new = {k: v.astype(params[k].dtype) for k, v in new.items()}
  return {**new, "k": jax.random.fold_in(params["k"], step), "n": None}


def _average_tree(state):
  for field in ("average", "averages"):
    if hasattr(state, field):
      return getattr(state, field)
  raise AssertionError(type(state))


def _flat(prefix, tree, out):
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode)
  )[0]
  for path, leaf in leaves:
    if leaf is None or isinstance(leaf, optax.MaskedNode):
      continue
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    key, value = prefix + jax.tree_util.keystr(path), np.asarray(leaf)
    if value.dtype == jnp.bfloat16:  # .npz has no bfloat16: keep the bits
      key, value = key + "@bfloat16", value.view(np.uint16)
    out[key] = value


def replay(name, with_params=False):
  """Runs configuration ``name``; returns ``{key: array}`` of every step.

  ``with_params`` also records the params after each step (``params/...``),
  which the golden file does not hold.
  """
  tx = CONFIGS[name]()
  skip = "skip_nonfinite" in name
  params = params0()
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = {}
  for step in range(1, STEPS + 1):
    updates = updates_at(step, skip)
    new_updates, state = update(updates, state, params)
    params = _apply(params, new_updates, step)
    prefix = f"{name}/{step:02d}/"
    if with_params:
      _flat(f"params/{step:02d}/", params, out)
    _flat(prefix + "average", _average_tree(state), out)
    out[prefix + "count"] = np.asarray(state.count)
    for which in WHICH.get(name, [None]):
      avg = optax_ema.averaged_params(state, params, which=which)
      _flat(prefix + f"averaged[{which!r}]", avg, out)
  return out


if __name__ == "__main__":
  golden = {}
  for name in CONFIGS:
    golden.update(replay(name))
  np.savez_compressed(GOLDEN, **golden)
  print(f"wrote {len(golden)} arrays for {len(CONFIGS)} configurations to {GOLDEN}")
