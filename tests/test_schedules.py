"""optax_ema.schedules against float64 NumPy restatements of their formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import schedules

COUNTS = np.array([0, 1, 2, 3, 10, 99, 1_000, 12_345, 100_000, 10**6, 10**7])


def _eval(schedule, counts=COUNTS):
  """The schedule at each count, jitted, as float64 for comparison."""
  fn = jax.jit(schedule)
  out = np.array([float(fn(jnp.int32(c))) for c in counts])
  assert all(fn(jnp.int32(c)).dtype == jnp.float32 for c in counts[:2])
  return out


def _assert_f32_close(got, want):
  # float32 holds a decay near 1 to ~6e-8; allow two float32 spacings.
  np.testing.assert_allclose(got, want, rtol=0, atol=1.2e-7)


def _np_warmup(c, max_decay, inv_gamma, power, min_decay, start):
  # diffusers' EMAModel.get_decay (timm and ema-pytorch agree): its k-th
  # step (optimization_step = k, our count k - 1) uses
  # step = k - update_after_step - 1, and 0 (a copy) while step <= 0.
  s = c.astype(np.float64) - start
  d = 1.0 - (1.0 + np.maximum(s, 0) / inv_gamma) ** -power
  return np.where(s > 0, np.clip(d, min_decay, max_decay), 0.0)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(max_decay=0.9999),
    dict(max_decay=0.99999, inv_gamma=1.0, power=0.75),
    dict(max_decay=0.999, inv_gamma=10.0, power=2 / 3, min_decay=0.5),
    dict(max_decay=1.0, power=0.5, start_step=100),
  ],
)
def test_warmup_matches_numpy_up_to_1e7(kwargs):
  full = dict(inv_gamma=1.0, power=2 / 3, min_decay=0.0, start_step=0) | kwargs
  want = _np_warmup(
    COUNTS,
    full["max_decay"],
    full["inv_gamma"],
    full["power"],
    full["min_decay"],
    full["start_step"],
  )
  _assert_f32_close(_eval(schedules.warmup(**kwargs)), want)


def test_warmup_is_zero_up_to_start_and_clipped_after():
  # At start_step itself the average copies the params (decay 0), also
  # with min_decay > 0: the first averaging step of timm / diffusers /
  # ema-pytorch; the next uses max(min_decay, 1 - 2 ** -power).
  sched = schedules.warmup(0.9, min_decay=0.45, start_step=5)
  got = _eval(sched, np.array([0, 4, 5, 6, 7, 10**6]))
  want = [0.0, 0.0, 0.0, 0.45, 1 - 3 ** (-2 / 3), 0.9]  # 1 - 2 ** (-2/3) = 0.37
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_warmup_with_min_decay_copies_on_its_first_averaging_step():
  # moving_average(warmup(min_decay=0.5)): the first step's average is the
  # params (not 0.5 of the way), as the three libraries' first step.
  tx = optax_ema.moving_average(optax.sgd(1.0), schedules.warmup(0.99, min_decay=0.5))
  params = {"w": jnp.array([1.0, 2.0])}
  updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(state.average["w"]), [0.0, 1.0])
  _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
  # Second step: decay max(0.5, 1 - 2 ** (-2/3)) = 0.5, towards [-1, 0].
  np.testing.assert_allclose(np.asarray(state.average["w"]), [-0.5, 0.5], rtol=1e-6)


def test_tf_ramp_matches_numpy_up_to_1e7():
  want = np.minimum(0.99999, (1.0 + COUNTS) / (10.0 + COUNTS))
  _assert_f32_close(_eval(schedules.tf_ramp(0.99999)), want)


def test_tf_ramp_schedule_equals_dynamic_decay():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.3, 0.1, -0.2])}
  results = []
  for kwargs in (
    dict(average_decay=schedules.tf_ramp(0.95)),
    dict(average_decay=0.95, dynamic_decay=True),
  ):
    tx = optax_ema.moving_average(optax.sgd(0.5), **kwargs)
    p, state = params, tx.init(params)
    for _ in range(30):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    results.append(np.asarray(optax_ema.averaged_params(state)["w"]))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_half_life_conversions_match_numpy():
  for h in (1.0, 10.0, 693.1, 1e4, 1e7):
    d = schedules.from_half_life(h)
    assert isinstance(d, float)
    assert math.isclose(d, 2.0 ** (-1.0 / h), rel_tol=1e-15)
    assert math.isclose(schedules.to_half_life(d), h, rel_tol=1e-9)
    assert math.isclose(d**h, 0.5, rel_tol=1e-8)
  arr = schedules.from_half_life(np.array([10.0, 100.0]))
  np.testing.assert_allclose(arr, 2.0 ** (-1.0 / np.array([10.0, 100.0])), rtol=1e-15)
  back = schedules.to_half_life(jnp.asarray([0.5, 0.9], jnp.float32))
  np.testing.assert_allclose(back, [1.0, math.log(0.5) / math.log(0.9)], rtol=1e-5)


def test_half_life_schedule_is_the_rounded_constant():
  for h in (5, 1000, 10**6):
    got = _eval(schedules.half_life(h))
    want = np.float32(2.0 ** (-1.0 / h))
    np.testing.assert_array_equal(got.astype(np.float32), np.full(len(COUNTS), want))


def _np_power(c, gamma):
  t = c.astype(np.float64) + 1.0
  return (1.0 - 1.0 / t) ** (gamma + 1.0)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
def test_power_matches_numpy_up_to_1e7(gamma):
  _assert_f32_close(_eval(schedules.power(gamma=gamma)), _np_power(COUNTS, gamma))


def test_power_by_sigma_rel_uses_the_papers_gammas():
  # EDM2, section 3.1: sigma_rel 0.05 -> gamma 16.97, 0.10 -> gamma 6.94.
  for sigma_rel, gamma in ((0.05, 16.97), (0.10, 6.94)):
    got = _eval(schedules.power(sigma_rel=sigma_rel))
    np.testing.assert_allclose(got, _np_power(COUNTS, gamma), atol=5e-3)
    assert got[0] == 0.0  # the first update copies the parameters


def test_power_schedule_runs_inside_moving_average():
  tx = optax_ema.moving_average(optax.sgd(1.0), schedules.power(gamma=1.0))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  xs = []
  for _ in range(4):
    updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    params = optax.apply_updates(params, updates)
    xs.append(float(params["w"][0]))
  # gamma=1: the average after t updates weighs x_i by (i^2 - (i-1)^2) / t^2.
  t = len(xs)
  want = sum((i**2 - (i - 1) ** 2) * x for i, x in enumerate(xs, start=1)) / t**2
  assert float(optax_ema.averaged_params(state)["w"][0]) == pytest.approx(
    want, rel=1e-6
  )


@pytest.mark.parametrize(
  "make, err",
  [
    (lambda: schedules.warmup(1.5), "`max_decay`"),
    (lambda: schedules.warmup(0.9, min_decay=0.95), "`min_decay`"),
    (lambda: schedules.warmup(0.9, inv_gamma=0.0), "`inv_gamma`"),
    (lambda: schedules.warmup(0.9, power=-1.0), "`power`"),
    (lambda: schedules.warmup(0.9, start_step=-1), "`start_step`"),
    (lambda: schedules.tf_ramp(float("nan")), "`max_decay`"),
    (lambda: schedules.half_life(0), "`steps`"),
    (lambda: schedules.from_half_life(-3.0), "`steps`"),
    (lambda: schedules.to_half_life(1.0), "`decay`"),
    (lambda: schedules.power(), "exactly one"),
    (lambda: schedules.power(gamma=1.0, sigma_rel=0.1), "exactly one"),
    (lambda: schedules.power(gamma=-2.0), "`gamma`"),
    (lambda: schedules.power(sigma_rel=0.5), "`sigma_rel`"),
  ],
)
def test_bad_schedule_arguments_raise_naming_the_argument(make, err):
  with pytest.raises(ValueError, match=err):
    make()


def test_bool_or_string_arguments_are_type_errors():
  with pytest.raises(TypeError, match="`max_decay`"):
    schedules.warmup(True)
  with pytest.raises(TypeError, match="`steps`"):
    schedules.half_life("100")


def test_per_leaf_marks_a_prefix_and_is_idempotent():
  marker = schedules.per_leaf({"a": 0.9})
  assert isinstance(marker, optax_ema._rules.PerLeafDecay)
  assert schedules.per_leaf(marker) is marker
  assert marker.prefix == {"a": 0.9}
