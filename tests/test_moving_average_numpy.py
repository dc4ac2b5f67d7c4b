"""50-step random trees against a NumPy restatement of TFA's MovingAverage.

The reference below is written from TFA's documented rules:
with ``t`` the count before the step, the decay is computed in float32 as

- ``D = min(average_decay, (1 + n) / (10 + n))`` with ``num_updates=n``, else
  ``average_decay`` (or ``schedule(t)``);
- ``0`` for ``t < start_step``;
- ``min(D, (1 + t - s) / (10 + t - s))`` with ``dynamic_decay``;
- ``D`` otherwise;

and each leaf moves as ``avg - (avg - x) * (1 - decay)`` in the leaf's dtype,
``x`` being the post-update parameters (``sequential_update=True``) or the
pre-update ones (``False``). The inner optimizer is plain SGD, restated in
NumPy too, so that the parameter trajectory is checked as well.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema

NUM_STEPS = 50
LEARNING_RATE = 0.1
AVERAGE_DECAY = 0.9
NUM_UPDATES = 4
START_STEP = 7

# A tree with matrices, vectors, scalars and nested dicts, lists and tuples;
# the leaves only give the shapes.
SHAPES = {
  "w": np.zeros((3, 4)),
  "b": np.zeros(4),
  "nested": [np.zeros(()), np.zeros((2, 2))],
  "tup": (np.zeros(5), {"x": np.zeros((1, 3)), "s": np.zeros(())}),
}


def _jnp_schedule(count):
  # Exact in float32 and float64 for integer counts (multiples of 2**-7), so
  # the float32 decay does not depend on the precision the schedule runs in.
  return 0.5 + 0.0078125 * jnp.minimum(count, 60)


def _np_schedule(count):
  return np.float32(0.5 + 0.0078125 * min(count, 60))


def _np_decay(t, *, schedule, num_updates, start_step, dynamic_decay):
  """TFA's decay at count ``t``, computed in float32."""
  f32 = np.float32
  decay = _np_schedule(t) if schedule else f32(AVERAGE_DECAY)
  if num_updates is not None:
    n = f32(num_updates)
    decay = min(decay, (f32(1.0) + n) / (f32(10.0) + n))
  step = f32(t)
  if step < f32(start_step):
    return f32(0.0)
  if dynamic_decay:
    since = step - f32(start_step)
    return min(decay, (f32(1.0) + since) / (f32(10.0) + since))
  return f32(decay)


def _np_reference(params0, grads, dtype, **decay_kwargs):
  """Params and averages after each step, as lists of flat leaf lists."""
  sequential = decay_kwargs.pop("sequential_update")
  params = [np.asarray(p, dtype) for p in params0]
  average = [p.copy() for p in params]
  lr = dtype(-LEARNING_RATE)
  all_params, all_averages = [], []
  for t in range(NUM_STEPS):
    new_params = [p + lr * g[t] for p, g in zip(params, grads, strict=True)]
    decay = dtype(_np_decay(t, **decay_kwargs))
    seen = new_params if sequential else params
    average = [
      a - (a - x) * (dtype(1.0) - decay) for a, x in zip(average, seen, strict=True)
    ]
    params = new_params
    all_params.append(params)
    all_averages.append(average)
  return all_params, all_averages


def _random_problem(dtype, seed):
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(SHAPES)
  shapes = [leaf.shape for leaf in leaves]
  params0 = [rng.normal(size=s).astype(dtype) for s in shapes]
  grads = [rng.normal(size=(NUM_STEPS, *s)).astype(dtype) for s in shapes]
  return treedef, params0, grads


COMBINATIONS = list(
  itertools.product(
    [True, False],  # sequential_update
    [None, NUM_UPDATES],  # num_updates
    [0, START_STEP],  # start_step
    [False, True],  # dynamic_decay
    [False, True],  # schedule instead of a constant average_decay
  )
)


def _ids(combo):
  seq, num, start, dyn, sched = combo
  return (
    f"seq={seq}-num_updates={num}-start={start}-dynamic={dyn}-"
    f"{'schedule' if sched else 'constant'}"
  )


def _kwargs(combo):
  sequential, num_updates, start_step, dynamic, schedule = combo
  return {
    "sequential_update": sequential,
    "num_updates": num_updates,
    "start_step": start_step,
    "dynamic_decay": dynamic,
    "schedule": schedule,
  }


@functools.cache
def _jax_histories(dtype):
  """Per-step params and averages for every combination, from one jit.

  All combinations share one compilation (compiling them one by one costs
  ten times as much); each runs ``NUM_STEPS`` steps under ``lax.scan`` on its
  own random problem. Returns, per combination, (params leaves, average
  leaves), each leaf of shape ``(NUM_STEPS, *shape)``.
  """
  problems = [_random_problem(dtype, seed) for seed in range(len(COMBINATIONS))]
  treedef = problems[0][0]
  txs = []
  for combo in COMBINATIONS:
    kwargs = _kwargs(combo)
    schedule = kwargs.pop("schedule")
    decay = _jnp_schedule if schedule else AVERAGE_DECAY
    txs.append(optax_ema.moving_average(optax.sgd(LEARNING_RATE), decay, **kwargs))

  def run_one(tx, params, grads):
    def step(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (params, optax_ema.averaged_params(state))

    _, history = jax.lax.scan(step, (params, tx.init(params)), grads)
    return history

  @jax.jit
  def run_all(all_params, all_grads):
    return [
      run_one(tx, p, g) for tx, p, g in zip(txs, all_params, all_grads, strict=True)
    ]

  all_params = [jax.tree.unflatten(treedef, p0) for _, p0, _ in problems]
  all_grads = [jax.tree.unflatten(treedef, g) for _, _, g in problems]
  histories = run_all(all_params, all_grads)
  return [
    (
      [np.asarray(x) for x in jax.tree.leaves(p)],
      [np.asarray(x) for x in jax.tree.leaves(a)],
    )
    for p, a in histories
  ]


def _check(dtype, combo, rtol, atol):
  index = COMBINATIONS.index(combo)
  _, params0, grads = _random_problem(dtype, index)
  got_params, got_avgs = _jax_histories(dtype)[index]
  want_params, want_avgs = _np_reference(params0, grads, dtype, **_kwargs(combo))
  for i, (got_p, got_a) in enumerate(zip(got_params, got_avgs, strict=True)):
    assert got_a.dtype == dtype, f"leaf {i}: average dtype {got_a.dtype}"
    want_p = np.stack([step[i] for step in want_params])
    want_a = np.stack([step[i] for step in want_avgs])
    np.testing.assert_allclose(
      got_p, want_p, rtol=rtol, atol=atol, err_msg=f"params {i}"
    )
    np.testing.assert_allclose(
      got_a, want_a, rtol=rtol, atol=atol, err_msg=f"average {i}"
    )


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_ids)
def test_matches_numpy_float32(combo):
  _check(np.float32, combo, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_ids)
def test_matches_numpy_float64(combo):
  with jax.enable_x64(True):
    _check(np.float64, combo, rtol=1e-13, atol=1e-13)


def test_float64_decay_is_computed_in_float32():
  # 0.9 is not a float32 number: a float64 run must use float32(0.9), as TFA.
  with jax.enable_x64(True):
    params = {"w": jnp.zeros(3, jnp.float64)}
    tx = optax_ema.moving_average(optax.sgd(1.0), average_decay=0.9)
    state = tx.init(params)
    grads = {"w": -jnp.ones(3, jnp.float64)}  # params become 1.0
    _, state = tx.update(grads, state, params)
    got = np.asarray(optax_ema.averaged_params(state)["w"])
  want = 1.0 - np.float64(np.float32(0.9))  # 0 - (0 - 1) * (1 - d)
  assert got.dtype == np.float64
  np.testing.assert_array_equal(got, np.full(3, want))
  assert want != pytest.approx(1.0 - 0.9, rel=1e-12, abs=0)
