"""Random configurations and trees against an independent NumPy restatement.

Hypothesis draws a parameter tree, a configuration of ``moving_average``
(constant decays or optax schedules, TFA's clamps, several averages,
``debias``, ``update_every``, a mask, ``skip_nonfinite`` with a NaN step,
``overwrite_every``) and a gradient sequence; the reference below replays
the documented rule in float64 with the decays rounded to float32, as TFA
computes them:

- a step counts when it is finite (with ``skip_nonfinite``); the count ``t``
  is the number of counted steps before it;
- on counted steps with ``(t + 1) % k == 0`` every average moves by
  ``w = 1 - prod(d(t - k + 1 .. t))`` towards ``x`` (the params after the
  step, or before it): ``a <- a - (a - x) w``; a debiased average starts
  from zero with weight ``c <- c + (1 - c) w`` and reads ``a / c``;
- with ``overwrite_every=m``, after counted steps with ``(t + 1) % m == 0``
  the params become the (first) average.

The runs are derandomized, so a failure reproduces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_ema

LR = 0.3
SETTINGS = settings(
  max_examples=40,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

shapes = st.lists(
  st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple),
  min_size=1,
  max_size=4,
)
constant_decays = st.floats(0.0, 0.98).map(lambda d: float(np.float32(d)))
# (start, end) of optax.linear_schedule over 8 counts: exact in float32.
schedules = st.tuples(st.sampled_from([0.25, 0.5, 0.75]), st.sampled_from([0.5, 0.875]))


@st.composite
def configurations(draw):
  n_averages = draw(st.integers(1, 3))
  decays = [draw(st.one_of(constant_decays, schedules)) for _ in range(n_averages)]
  every = draw(st.sampled_from([1, 1, 2, 3]))
  sequential = draw(st.booleans())
  return {
    "decays": decays,
    "sequential_update": sequential,
    "num_updates": draw(st.one_of(st.none(), st.integers(0, 20))),
    "start_step": draw(st.sampled_from([0, 0, 2, 5])),
    "dynamic_decay": draw(st.booleans()),
    "debias": draw(st.booleans()),
    "update_every": every,
    "skip_nonfinite": draw(st.booleans()),
    # An overwrite needs the average of the params after the step.
    "overwrite_every": draw(st.sampled_from([None, None, every * 2]))
    if sequential
    else None,
    "masked": draw(st.booleans()),
  }


def _decay_spec(d):
  if isinstance(d, tuple):
    return optax.linear_schedule(d[0], d[1], 8)
  return d


def _np_decay(d, t, config):
  """One per-step decay, in float32, as TFA computes it."""
  f32 = np.float32
  if isinstance(d, tuple):
    decay = f32(d[0] + (d[1] - d[0]) * min(t, 8) / 8)
  else:
    decay = f32(d)
  if config["num_updates"] is not None:
    n = f32(config["num_updates"])
    decay = min(decay, (f32(1) + n) / (f32(10) + n))
  if t < config["start_step"]:
    return 0.0
  if config["dynamic_decay"]:
    since = f32(t) - f32(config["start_step"])
    decay = min(decay, (f32(1) + since) / (f32(10) + since))
  return float(decay)


def _np_run(config, params0, grads, mask):
  """(params, readable averages) after the run, in float64."""
  k = config["update_every"]
  p = [np.asarray(x, np.float64) for x in params0]
  avgs = [[x.copy() for x in p] for _ in config["decays"]]
  weights = [0.0 for _ in config["decays"]]
  count = 0

  def read(j, params):
    if not config["debias"]:
      return avgs[j]
    if weights[j] == 0:
      return params
    return [a / weights[j] for a in avgs[j]]

  for g in grads:
    new_p = [
      x - np.float32(LR) * np.asarray(gg, np.float64)
      for x, gg in zip(p, g, strict=True)
    ]
    finite = all(np.all(np.isfinite(x)) for x in g) and all(
      np.all(np.isfinite(x)) for x in new_p
    )
    if config["skip_nonfinite"] and not finite:
      continue  # the loop, like apply_if_finite, does not apply it either
    x = new_p if config["sequential_update"] else p
    if (count + 1) % k == 0:
      for j, d in enumerate(config["decays"]):
        steps = range(count - k + 1, count + 1)
        keep = np.prod([_np_decay(d, i, config) for i in steps])
        w = 1.0 - keep
        for i, (a, xi) in enumerate(zip(avgs[j], x, strict=True)):
          if not mask[i]:
            continue
          base = a if (not config["debias"] or weights[j] > 0) else np.zeros_like(a)
          avgs[j][i] = xi.copy() if w == 1 else base - (base - xi) * w
        if config["debias"]:
          weights[j] = weights[j] - (weights[j] - 1.0) * w
    count += 1
    m = config["overwrite_every"]
    if m and count % m == 0:
      first = read(0, new_p)
      new_p = [first[i] if mask[i] else new_p[i] for i in range(len(new_p))]
    p = new_p
  return p, [read(j, p) for j in range(len(config["decays"]))]


@SETTINGS
@given(shapes=shapes, config=configurations(), data=st.data())
def test_moving_average_matches_the_numpy_restatement(shapes, config, data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  steps = data.draw(st.integers(1, 10))
  params0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
  grads = [
    [rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(steps)
  ]
  if config["skip_nonfinite"] and steps > 1:
    nan_step = data.draw(st.integers(0, steps - 1))
    grads[nan_step][0] = np.full(shapes[0], np.nan, np.float32)
  mask = [True] + [data.draw(st.booleans()) for _ in shapes[1:]]
  if not config["masked"]:
    mask = [True] * len(shapes)
  decays = tuple(_decay_spec(d) for d in config["decays"])
  tx = optax_ema.moving_average(
    optax.sgd(LR),
    decays if len(decays) > 1 else decays[0],
    sequential_update=config["sequential_update"],
    num_updates=config["num_updates"],
    start_step=config["start_step"],
    dynamic_decay=config["dynamic_decay"],
    debias=config["debias"],
    update_every=config["update_every"],
    skip_nonfinite=config["skip_nonfinite"],
    overwrite_every=config["overwrite_every"],
    overwrite_with=0 if config["overwrite_every"] and len(decays) > 1 else None,
    mask=list(mask) if config["masked"] else None,
  )
  params = [jnp.asarray(x) for x in params0]
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update([jnp.asarray(x) for x in g], state, params)
    new = optax.apply_updates(params, updates)
    if all(bool(jnp.all(jnp.isfinite(x))) for x in new):
      params = new  # a NaN step is not applied, as in the reference
  want_params, want_avgs = _np_run(config, params0, grads, mask)
  for got, want in zip(params, want_params, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for j, want in enumerate(want_avgs):
    which = j if len(decays) > 1 else None
    got = optax_ema.averaged_params(state, params, which=which)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      if mask[i]:
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{j} {i}")


@SETTINGS
@given(
  shapes=shapes,
  sigma_rels=st.lists(
    st.sampled_from([0.03, 0.05, 0.1, 0.2]), min_size=1, max_size=3, unique=True
  ),
  steps=st.integers(1, 12),
  seed=st.integers(0, 2**16),
)
def test_power_ema_matches_the_numpy_restatement(shapes, sigma_rels, steps, seed):
  rng = np.random.default_rng(seed)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  grads = [
    [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes] for _ in range(steps)
  ]
  tx = optax_ema.power_ema(optax.sgd(LR), sigma_rels=sigma_rels)
  state, p = tx.init(params), params
  seen = []
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, updates)
    seen.append([np.asarray(x, np.float64) for x in p])
  for s in sigma_rels:
    gamma = optax_ema.posthoc.sigma_rel_to_gamma(s)
    # The closed form: weights (i**(g+1) - (i-1)**(g+1)) / t**(g+1).
    t = len(seen)
    w = np.array([(i ** (gamma + 1) - (i - 1) ** (gamma + 1)) for i in range(1, t + 1)])
    w = w / t ** (gamma + 1)
    want = [
      sum(wi * x[i] for wi, x in zip(w, seen, strict=True)) for i in range(len(shapes))
    ]
    got = optax_ema.averaged_params(state, p, which=s)
    for g_, w_ in zip(got, want, strict=True):
      np.testing.assert_allclose(g_, w_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("period", [1, 3])
@SETTINGS
@given(start=st.integers(0, 4), steps=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_swa_matches_the_mean_of_its_snapshots(period, start, steps, seed):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  tx = optax_ema.swa(optax.sgd(LR), start_averaging=start, average_period=period)
  state, p = tx.init(params), params
  snapshots = []
  for t in range(steps):
    g = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    updates, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, updates)
    if t >= start and (t - start) % period == 0:
      snapshots.append(np.asarray(p["w"], np.float64))
  want = np.mean(snapshots, axis=0) if snapshots else np.asarray(p["w"])
  got = optax_ema.averaged_params(state)["w"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
