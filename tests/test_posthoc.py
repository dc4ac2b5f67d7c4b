"""optax_ema.posthoc: EDM2's solver, exactly, and what it reconstructs.

The reference is NumPy written here from the paper (Karras et al., EDM2,
appendix C): the exponent of a width is the largest real root of
gamma**3 + 7 gamma**2 + (16 - s**-2) gamma + 12 - s**-2; the profile ending
at t is (g + 1) tau**g / t**(g + 1) on [0, t], whose inner products are
(g_a + 1)(g_b + 1) / (g_a + g_b + 1) min(t_a, t_b)**(g_a + g_b + 1) /
(t_a**(g_a + 1) t_b**(g_b + 1)); the coefficients solve A x = b and, as the
released EDM2 code does, are divided by their sum. The discrete power EMA
weighs update i of t by (i**(g+1) - (i-1)**(g+1)) / t**(g+1).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import posthoc
from optax_ema.posthoc import _reconstruct
from optax_ema.posthoc import _solver

T = 1000  # steps of the synthetic runs
EVERY = 50  # snapshot interval


# --- the independent reference ---------------------------------------------


def ref_gamma(sigma_rel):
  t = sigma_rel**-2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return max(r.real for r in roots if abs(r.imag) < 1e-9)


def ref_inner(t_a, g_a, t_b, g_b):
  m = min(t_a, t_b)
  scale = (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0)
  return scale * (m / t_a) ** (g_a + 1.0) * (m / t_b) ** (g_b + 1.0) / m


def ref_coefficients(steps, sigmas, target_step, target_sigma):
  """EDM2's normalised least-squares coefficients and the profile fit error."""
  g = [ref_gamma(s) for s in sigmas]
  gr = ref_gamma(target_sigma)
  n = len(steps)
  a = np.array(
    [[ref_inner(steps[i], g[i], steps[j], g[j]) for j in range(n)] for i in range(n)]
  )
  b = np.array([ref_inner(steps[i], g[i], target_step, gr) for i in range(n)])
  x = np.linalg.solve(a, b)
  c = x / x.sum()
  norm2 = ref_inner(target_step, gr, target_step, gr)
  err = np.sqrt(max(norm2 - 2 * c @ b + c @ a @ c, 0.0) / norm2)
  return c, err


def ref_power_average(xs, gamma):
  t = len(xs)
  i = np.arange(1, t + 1, dtype=np.float64)
  w = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)
  return w @ np.asarray(xs, np.float64)


def _rel(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


# --- runs --------------------------------------------------------------------


def _random_walk_with_drift(n_steps, dim=64, seed=0):
  rng = np.random.default_rng(seed)
  start = 1.0 + rng.normal(size=dim)  # weights with a nonzero mean
  drift = 0.002 * rng.normal(size=dim)
  steps = drift + 0.01 * rng.normal(size=(n_steps, dim))
  return np.concatenate([start[None], start + np.cumsum(steps, axis=0)])


def _drive(directory, traj, every=EVERY, dtype=np.float32, sigma_rels=(0.05, 0.10)):
  """power_ema(sgd(1)) moved along ``traj``; snapshots every ``every`` steps.

  Returns the float64 host copies of the averages at each snapshot, keyed by
  (step, sigma_rel), read from the state (not from the files).
  """
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=sigma_rels)
  params = jnp.asarray(traj[0], jnp.float32)
  state = tx.init(params)
  step = jax.jit(tx.update)
  kept = {}
  with posthoc.SnapshotWriter(directory, every=every, dtype=dtype) as writer:
    for t in range(1, len(traj)):
      grads = params - jnp.asarray(traj[t], jnp.float32)
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
      if writer(state, t):
        for s in sigma_rels:
          avg = optax_ema.averaged_params(state, which=s)
          kept[t, s] = np.asarray(avg, np.float64)
  return kept


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
  directory = tmp_path_factory.mktemp("walk")
  traj = _random_walk_with_drift(T)
  kept = _drive(directory, traj)
  return directory, traj, kept


# --- the coefficients ----------------------------------------------------------


@pytest.mark.parametrize("target", [0.02, 0.07, 0.15, 0.25])
def test_coefficients_match_edm2_normalised_solver(target):
  steps = np.repeat(np.arange(1, 9) * 1000.0, 2)
  sigmas = [0.05, 0.10] * 8
  gammas = [ref_gamma(s) for s in sigmas]
  coef, err = posthoc.solve_weights(steps, gammas, 8000.0, ref_gamma(target))
  want, want_err = ref_coefficients(steps, sigmas, 8000.0, target)
  np.testing.assert_allclose(coef, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
  np.testing.assert_allclose(coef.sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(err, want_err, rtol=1e-6, atol=1e-12)


def test_fit_error_is_the_profile_distance_by_quadrature():
  steps, sigmas = [400.0, 400.0, 1000.0, 1000.0], [0.05, 0.10, 0.05, 0.10]
  coef, err = posthoc.solve_weights(
    steps, [ref_gamma(s) for s in sigmas], 1000.0, ref_gamma(0.07)
  )
  tau = np.linspace(0.0, 1000.0, 400_001)

  def profile(t, s):
    g = ref_gamma(s)
    return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

  resid = profile(1000.0, 0.07) - sum(
    c * profile(t, s) for c, t, s in zip(coef, steps, sigmas, strict=True)
  )
  want = np.sqrt(
    np.trapezoid(resid**2, tau) / np.trapezoid(profile(1000.0, 0.07) ** 2, tau)
  )
  np.testing.assert_allclose(err, want, rtol=1e-2)


def test_solver_is_finite_for_long_runs_and_sharp_profiles():
  steps = np.repeat(np.arange(1, 11) * 10**7, 2)
  gammas = np.tile([ref_gamma(0.01), ref_gamma(0.02)], 10)
  coef, err = posthoc.solve_weights(steps, gammas, 10**8, ref_gamma(0.015))
  assert np.all(np.isfinite(coef)) and np.isfinite(err) and err < 0.05


def test_a_tracked_profile_at_a_snapshot_step_is_its_own_snapshot():
  gammas = [ref_gamma(0.05), ref_gamma(0.10)] * 2
  coef, err = posthoc.solve_weights([50, 50, 100, 100], gammas, 100, gammas[1])
  np.testing.assert_allclose(coef, [0.0, 0.0, 0.0, 1.0], atol=1e-9)
  assert err < 1e-6


@pytest.mark.orbax
def test_weights_use_only_snapshots_up_to_the_target_step(walk):
  directory, _, _ = walk
  w = posthoc.reconstruction_weights(directory, 0.07, step=300)
  assert w.step == 300
  np.testing.assert_array_equal(np.unique(w.snapshot_steps), np.arange(50, 301, 50))
  want, _ = ref_coefficients(w.snapshot_steps, w.snapshot_sigma_rels, 300, 0.07)
  np.testing.assert_allclose(w.coefficients, want, rtol=1e-6, atol=1e-9)


# --- what it reconstructs --------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.orbax
def test_a_constant_parameter_reconstructs_to_itself_for_any_target(tmp_path, dtype):
  traj = np.full((201, 8), 1.25)  # exact in float16 too
  _drive(tmp_path, traj, every=100, dtype=dtype)  # two snapshots, as the README
  for step in (100, 200):
    for sigma_rel in (0.02, 0.07, 0.20, 0.30):
      with warnings.catch_warnings():  # 0.02 and 0.30 fit poorly: they warn
        warnings.filterwarnings("ignore", "posthoc: the target", UserWarning)
        got = posthoc.reconstruct(tmp_path, sigma_rel, step=step)
      np.testing.assert_allclose(got, 1.25, rtol=2e-6, err_msg=f"{step} {sigma_rel}")


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
@pytest.mark.parametrize("step", [T, T // 2])
@pytest.mark.orbax
def test_random_walk_with_drift_is_reconstructed_as_edm2_does(walk, sigma_rel, step):
  directory, traj, kept = walk
  direct = ref_power_average(traj[1 : step + 1], ref_gamma(sigma_rel))
  used = [(t, s) for (t, s) in sorted(kept) if t <= step]
  c, _ = ref_coefficients([t for t, _ in used], [s for _, s in used], step, sigma_rel)
  edm2 = sum(ci * kept[key] for ci, key in zip(c, used, strict=True))
  got = posthoc.reconstruct(directory, sigma_rel, step=step)
  assert _rel(got, edm2) < 1e-6  # the same combination, float32 accumulation
  assert _rel(got, direct) <= _rel(edm2, direct) * (1 + 1e-3) + 1e-7
  assert _rel(got, direct) < 3e-3


@pytest.mark.orbax
def test_device_and_host_paths_agree(walk):
  directory, traj, _ = walk
  host = posthoc.reconstruct(directory, 0.07)
  like = jax.ShapeDtypeStruct(traj[0].shape, jnp.float32)
  device = posthoc.reconstruct(directory, 0.07, like=like)
  assert isinstance(device, jax.Array) and device.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(device), host, rtol=1e-6)


@pytest.mark.orbax
def test_tracked_width_is_recovered_from_its_snapshot(walk):
  directory, _, kept = walk
  for sigma_rel in (0.05, 0.10):
    got = posthoc.reconstruct(directory, sigma_rel, step=500)
    np.testing.assert_allclose(got, kept[500, sigma_rel], rtol=1e-6)


@pytest.mark.orbax
def test_float16_storage_costs_little(tmp_path, walk):
  _, traj, _ = walk
  _drive(tmp_path, traj, every=100, dtype=np.float16)
  direct = ref_power_average(traj[1:], ref_gamma(0.07))
  assert _rel(posthoc.reconstruct(tmp_path, 0.07), direct) < 2e-3


# --- the target step -------------------------------------------------------------


@pytest.mark.orbax
def test_a_step_between_snapshots_is_an_error_listing_the_steps(tmp_path):
  _drive(tmp_path, np.full((41, 4), 1.0), every=20)
  with pytest.raises(ValueError, match=r"step of a snapshot.*got 30.*steps 20, 40"):
    posthoc.reconstruct(tmp_path, 0.07, step=30)
  with pytest.raises(ValueError, match=r"steps 20, 40"):
    posthoc.reconstruction_weights(tmp_path, 0.07, step=41)


@pytest.mark.orbax
def test_default_step_is_the_last_snapshot(walk):
  directory, _, _ = walk
  assert posthoc.reconstruction_weights(directory, 0.07).step == T


@pytest.mark.parametrize("step", [2.0, True, "10"])
@pytest.mark.orbax
def test_step_of_another_type_is_an_error(walk, step):
  directory, _, _ = walk
  with pytest.raises(TypeError, match="`step` must be None or an int"):
    posthoc.reconstruct(directory, 0.07, step=step)


# --- bad input -------------------------------------------------------------------


@pytest.mark.orbax
def test_one_profile_only_is_an_error(tmp_path):
  _drive(tmp_path, np.zeros((21, 3)), every=10, sigma_rels=(0.05,))
  with pytest.raises(ValueError, match=r"at least two profiles .* got only \[0.05\]"):
    posthoc.reconstruct(tmp_path, 0.07)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.05, 0.31, float("nan")])
@pytest.mark.orbax
def test_sigma_rel_outside_solvable_range_is_an_error(walk, sigma_rel):
  directory, _, _ = walk
  with pytest.raises(ValueError, match=r"`sigma_rel` must be in \(0, 0.300283\]"):
    posthoc.reconstruct(directory, sigma_rel)


def test_repeated_profile_is_an_error():
  g = ref_gamma(0.05)
  with pytest.raises(ValueError, match="linearly dependent"):
    posthoc.solve_weights([10, 10], [g, g], 10, g)


@pytest.mark.orbax
def test_profiles_read_in_chunks_give_the_same_result(tmp_path, monkeypatch):
  tx = optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.10))
  params = {"a": jnp.zeros(6), "b": jnp.zeros(2)}
  state = tx.init(params)
  with posthoc.SnapshotWriter(tmp_path, every=10) as writer:
    for t in range(1, 31):
      grads = {"a": -jnp.arange(6.0) * np.sin(t), "b": -jnp.ones(2)}
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      writer(state, t)
  like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
  whole = posthoc.reconstruct(tmp_path, 0.07)
  whole_device = posthoc.reconstruct(tmp_path, 0.07, like=like)
  monkeypatch.setattr(_reconstruct, "CHUNK_BYTES", 8)  # one leaf per restore
  monkeypatch.setattr(_reconstruct, "_BLOCK", 4)  # host sums in blocks of 4
  specs = {("a",): jax.ShapeDtypeStruct((6,), np.float16), ("b",): like["b"]}
  assert _reconstruct.chunks(specs) == [[("a",)], [("b",)]]
  for k in ("a", "b"):
    np.testing.assert_array_equal(posthoc.reconstruct(tmp_path, 0.07)[k], whole[k])
    np.testing.assert_array_equal(
      posthoc.reconstruct(tmp_path, 0.07, like=like)[k], whole_device[k]
    )


# --- a warning for targets the stored profiles fit poorly ----------------------------


def test_the_fit_error_threshold_is_a_tenth():
  assert _solver.FIT_ERROR_WARNING == 0.1


@pytest.mark.orbax
def test_a_poorly_fit_target_warns_exactly_when_its_fit_error_exceeds_a_tenth(
  tmp_path,
):
  traj = _random_walk_with_drift(400, dim=4)
  _drive(tmp_path, traj, every=40)  # 10 snapshots of 0.05 and 0.10
  steps = [t for t in range(40, 401, 40) for _ in range(2)]
  sigmas = [0.05, 0.10] * 10
  seen = {True: 0, False: 0}
  for sigma_rel in (0.01, 0.02, 0.03, 0.07, 0.15, 0.2, 0.25, 0.3):
    _, err = ref_coefficients(steps, sigmas, 400, sigma_rel)
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      fit = posthoc.reconstruction_weights(tmp_path, sigma_rel)
      posthoc.reconstruct(tmp_path, sigma_rel)
    assert abs(fit.fit_error - err) < 1e-6
    poor = err > 0.1
    seen[poor] += 1
    assert len(record) == (2 if poor else 0), (sigma_rel, err, record)
    for r in record:
      assert r.category is UserWarning and r.filename == __file__
      assert f"sigma_rel={sigma_rel:g} at step 400" in str(r.message)
      assert f"{err:.2f} (above 0.1)" in str(r.message)
  assert seen[True] >= 2 and seen[False] >= 2  # both sides of the threshold


@pytest.mark.orbax
def test_a_tracked_width_at_a_snapshot_step_never_warns(walk):
  directory, _, _ = walk
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for step in range(EVERY, T + 1, EVERY):
      for sigma_rel in (0.05, 0.10):
        fit = posthoc.reconstruction_weights(directory, sigma_rel, step)
        assert fit.fit_error < 1e-6


@pytest.mark.orbax
def test_the_warning_can_be_silenced_by_the_caller(tmp_path):
  _drive(tmp_path, _random_walk_with_drift(200, dim=2), every=100)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", "posthoc: the target", UserWarning)
    assert posthoc.reconstruction_weights(tmp_path, 0.01).fit_error > 0.1
