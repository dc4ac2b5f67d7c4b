"""Power-function EMA scalar math against NumPy references from the EDM2 formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ema import _power_math as pm

SIGMAS = [0.01, 0.05, 0.07, 0.10, 0.15, 0.20, 0.28]


def _largest_real_root(sigma_rel):
  # EDM2 appendix C.2: sigma_rel**2 (g + 2)**2 (g + 3) = g + 1, as a cubic.
  t = sigma_rel**-2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return max(r.real for r in roots if abs(r.imag) < 1e-9)


def _profile_std(gamma, n=400_001):
  # Standard deviation of the density (g + 1) tau**g on [0, 1], by quadrature.
  tau = np.linspace(0.0, 1.0, n)
  density = (gamma + 1.0) * tau**gamma
  mean = np.trapezoid(tau * density, tau)
  return np.sqrt(np.trapezoid((tau - mean) ** 2 * density, tau))


@pytest.mark.parametrize("sigma_rel", SIGMAS)
def test_sigma_rel_to_gamma_is_largest_root_of_cubic(sigma_rel):
  np.testing.assert_allclose(
    pm.sigma_rel_to_gamma(sigma_rel), _largest_real_root(sigma_rel), rtol=1e-10
  )


def test_sigma_rel_to_gamma_matches_paper_values():
  # EDM2 section 3.1: sigma_rel 0.05 and 0.10 correspond to gamma 16.97 and 6.94.
  assert round(pm.sigma_rel_to_gamma(0.05), 2) == 16.97
  assert round(pm.sigma_rel_to_gamma(0.10), 2) == 6.94


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97, 50.0])
def test_gamma_to_sigma_rel_is_profile_std(gamma):
  np.testing.assert_allclose(
    pm.gamma_to_sigma_rel(gamma), _profile_std(gamma), rtol=1e-5
  )


def test_conversions_round_trip_on_arrays():
  sigmas = np.array(SIGMAS)
  np.testing.assert_allclose(
    pm.gamma_to_sigma_rel(pm.sigma_rel_to_gamma(sigmas)), sigmas, rtol=1e-12
  )


def test_sigma_rel_to_gamma_traces_under_jit():
  got = jax.jit(pm.sigma_rel_to_gamma)(jnp.array(SIGMAS, jnp.float32))
  want = [_largest_real_root(s) for s in SIGMAS]
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)


def test_traced_sigma_rel_out_of_range_gives_nan():
  got = jax.jit(pm.sigma_rel_to_gamma)(jnp.float32(0.35))
  assert np.isnan(float(got))


def test_widest_profile_is_sigma_rel_max():
  # sigma_rel(gamma) peaks where d/dgamma log sigma_rel**2 = 0.
  grid = np.linspace(-0.99, 5.0, 600_001)
  values = np.sqrt((grid + 1) / ((grid + 2) ** 2 * (grid + 3)))
  np.testing.assert_allclose(pm.SIGMA_REL_MAX, values.max(), rtol=1e-9)
  np.testing.assert_allclose(
    pm.sigma_rel_to_gamma(pm.SIGMA_REL_MAX), grid[values.argmax()], atol=1e-4
  )


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31, float("nan"), 1.0])
def test_sigma_rel_out_of_range_is_an_error(bad):
  with pytest.raises(ValueError, match="`sigma_rel` must be in"):
    pm.sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [-1.0, -2.0, float("nan")])
def test_gamma_not_above_minus_one_is_an_error(bad):
  with pytest.raises(ValueError, match="`gamma` must be > -1"):
    pm.gamma_to_sigma_rel(bad)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
def test_power_decay_matches_formula(gamma):
  count = np.arange(0, 50)
  t = count + 1.0
  want = (1.0 - 1.0 / t) ** (gamma + 1.0)
  np.testing.assert_allclose(np.asarray(pm.power_decay(count, gamma)), want, rtol=2e-6)
  np.testing.assert_allclose(
    np.asarray(pm.power_weight(count, gamma)), 1.0 - want, rtol=2e-5, atol=1e-7
  )


def test_first_update_copies_the_parameters():
  assert float(pm.power_decay(0, 6.94)) == 0.0
  assert float(pm.power_weight(0, 6.94)) == 1.0


def test_power_weight_is_accurate_in_float32_for_long_runs():
  gamma = 6.94
  for count in [10**4, 10**6, 10**8]:
    t = count + 1.0
    want = -np.expm1((gamma + 1.0) * np.log1p(-1.0 / t))  # float64
    got = float(jax.jit(pm.power_weight)(jnp.int32(count), jnp.float32(gamma)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_power_decay_is_a_moving_average_schedule():
  decay = jax.jit(lambda c: pm.power_decay(c, 1.0))(jnp.int32(3))
  assert decay.dtype == jnp.float32
  np.testing.assert_allclose(float(decay), 0.75**2, rtol=1e-6)


@pytest.mark.parametrize("sigma_rel,steps", [(0.05, 10_000), (0.10, 1_000), (0.2, 50)])
def test_equivalent_classic_decay_has_the_same_width(sigma_rel, steps):
  d = pm.sigma_rel_to_ema_decay(sigma_rel, steps)
  # Weights (1 - d) d**k, k = 0, 1, ...: standard deviation by summation.
  k = np.arange(0, 200 * steps)
  w = (1 - d) * d**k
  mean = np.sum(k * w)
  std = np.sqrt(np.sum((k - mean) ** 2 * w))
  np.testing.assert_allclose(std, sigma_rel * steps, rtol=1e-6)


def test_equivalent_classic_decay_rejects_bad_input():
  with pytest.raises(ValueError, match="`sigma_rel` and `num_steps` must be > 0"):
    pm.sigma_rel_to_ema_decay(0.05, 0)
