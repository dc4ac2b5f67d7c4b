"""bfloat16 average storage with stochastic rounding vs a float64 reference.

10,000 steps at decay 0.999 on bfloat16 params that drift slowly under
noise: the float64 reference is the exact EMA of the same bfloat16 values.
Errors are measured in units of the bfloat16 spacing at each value (ulp).
"""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import optax_ema
from optax_ema import _rounding as _core

N, STEPS, DECAY = 256, 10_000, 0.999


@pytest.fixture(scope="module")
def trajectory():
  rng = np.random.default_rng(0)
  base = rng.uniform(0.5, 2.0, N)
  t = np.arange(STEPS)[:, None]
  traj = base + 0.05 * t / STEPS + 0.003 * rng.standard_normal((STEPS, N))
  traj_bf16 = traj.astype(ml_dtypes.bfloat16)
  x = traj_bf16.astype(np.float64)
  ref = np.empty_like(x)
  a = x[0].copy()
  d = float(np.float32(DECAY))
  for i in range(STEPS):
    a = d * a + (1.0 - d) * x[i]
    ref[i] = a
  ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - 7)  # bfloat16 spacing
  return traj_bf16, ref, ulp


def _averages_over_run(traj_bf16, **kwargs):
  # sequential_update=False averages the params passed in: the trajectory.
  tx = optax_ema.moving_average(
    optax.identity(), DECAY, sequential_update=False, **kwargs
  )
  state = tx.init(jnp.asarray(traj_bf16[0]))

  def body(state, p):
    _, state = tx.update(jnp.zeros_like(p), state, p)
    return state, state.average.astype(jnp.float32)

  state, history = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(
    state, jnp.asarray(traj_bf16)
  )
  return state, np.asarray(history, np.float64)


def _errors_in_ulp(history, ref, ulp):
  err = np.abs(history - ref) / ulp
  return {
    "final_rms": float(np.sqrt(np.mean(err[-1] ** 2))),
    "final_max": float(err[-1].max()),
    "run_rms": float(np.sqrt(np.mean(err[1000:] ** 2))),
  }


def test_stochastic_rounding_tracks_float64_where_nearest_bf16_is_stuck(trajectory):
  traj, ref, ulp = trajectory
  sr_state, sr = _averages_over_run(
    traj, ema_dtype=jnp.bfloat16, stochastic_rounding=True
  )
  _, default = _averages_over_run(traj, ema_dtype=jnp.bfloat16)
  with pytest.warns(UserWarning, match=r"bfloat16.*will not move"):
    _, nearest = _averages_over_run(
      traj, ema_dtype=jnp.bfloat16, stochastic_rounding=False
    )
  _, f32 = _averages_over_run(traj)
  sr_err = _errors_in_ulp(sr, ref, ulp)
  nearest_err = _errors_in_ulp(nearest, ref, ulp)
  f32_err = _errors_in_ulp(f32, ref, ulp)
  # Measured on this data: stochastic 0.7 rms / ~3 max ulp, nearest ~8 rms.
  assert sr_err["final_rms"] < 1.5, sr_err
  assert sr_err["run_rms"] < 1.5, sr_err
  assert sr_err["final_max"] < 8.0, sr_err
  assert nearest_err["final_rms"] > 4 * sr_err["final_rms"], (nearest_err, sr_err)
  assert f32_err["final_max"] < 0.05, f32_err
  # Half the memory of the float32 default.
  assert sr_state.average.dtype == jnp.bfloat16
  # Low-precision storage rounds stochastically unless told otherwise.
  np.testing.assert_array_equal(default, sr)


@pytest.mark.parametrize("seed", [0, 12345])
def test_round_stochastic_bf16_is_unbiased_and_on_the_grid(seed):
  x = jnp.full((200_000,), 1.0 + 0.3 * 2.0**-7, jnp.float32)  # 0.3 of a place
  bits = _core.rounding_bits(x.shape, _core.rounding_seed(jnp.int32(seed), 0, 0))
  out = _core.round_stochastic_bf16(x, bits)
  assert out.dtype == jnp.bfloat16
  values = np.unique(np.asarray(out, np.float64))
  np.testing.assert_array_equal(values, [1.0, 1.0 + 2.0**-7])
  frac_up = float(np.mean(np.asarray(out, np.float64) > 1.0))
  assert abs(frac_up - 0.3) < 0.01
  neg = _core.round_stochastic_bf16(-x, bits)
  assert abs(float(np.mean(np.asarray(neg, np.float64))) + float(x[0])) < 1e-4
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float32)
  got = np.asarray(_core.round_stochastic_bf16(special, bits[:4]), np.float32)
  assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2]) and got[3] == 0


@pytest.mark.parametrize(
  ("value", "lo", "hi"),
  [
    (1.0 + 0.3 * 2.0**-10, 1.0, 1.0 + 2.0**-10),  # 0.3 of a float16 place at 1
    (-3.0 - 0.7 * 2.0**-9, -3.0 - 2.0**-9, -3.0),  # negative, 0.7 of a place
    (1e-6, 2.0**-20 * 0.0 + 16 * 2.0**-24, 17 * 2.0**-24),  # subnormal range
  ],
)
def test_round_stochastic_float16_is_unbiased_and_on_the_grid(value, lo, hi):
  x = jnp.full((200_000,), value, jnp.float32)
  bits = _core.rounding_bits(x.shape, _core.rounding_seed(jnp.int32(3), 0, 0))
  out = _core.round_stochastic(x, jnp.float16, bits)
  assert out.dtype == jnp.float16
  values = np.unique(np.asarray(out, np.float64))
  np.testing.assert_array_equal(values, [lo, hi])
  frac_up = float(np.mean(np.asarray(out, np.float64) == hi))
  assert abs(frac_up - (value - lo) / (hi - lo)) < 0.01
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0, 1e6], jnp.float32)
  got = np.asarray(_core.round_stochastic(special, jnp.float16, bits[:5]), np.float32)
  assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2]) and got[3] == 0
  assert got[4] == np.inf  # beyond float16's range, as nearest rounding gives


def test_float16_average_rounds_stochastically_by_default_and_tracks():
  # The float16 counterpart of the bfloat16 trajectory: decay 0.9999, whose
  # step is below float16's resolution (2**-10), on params drifting slowly.
  rng = np.random.default_rng(2)
  n, steps, decay = 512, 4000, 0.9999
  base = rng.uniform(0.5, 2.0, n)
  traj = (base + 0.2 * np.arange(steps)[:, None] / steps).astype(np.float16)
  ref = traj[0].astype(np.float64)
  for x in traj.astype(np.float64):
    ref = ref - (ref - x) * (1 - float(np.float32(decay)))

  def final(**kwargs):
    tx = optax_ema.moving_average(
      optax.identity(), decay, sequential_update=False, ema_dtype=jnp.float16, **kwargs
    )
    state = tx.init(jnp.asarray(traj[0]))

    def body(state, p):
      return tx.update(jnp.zeros_like(p), state, p)[1], None

    state, _ = jax.lax.scan(body, state, jnp.asarray(traj))
    return np.asarray(state.average, np.float64)

  ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - 10)
  stochastic = (final() - ref) / ulp
  with pytest.warns(UserWarning, match="float16.*will not move"):
    nearest = (final(stochastic_rounding=False) - ref) / ulp
  rms = lambda e: float(np.sqrt(np.mean(e**2)))
  # Measured: stochastic 5.7 ulp rms (its noise is about sqrt(lag * ulp / 2),
  # lag ~ 0.07 here) and unbiased (mean 0.1 ulp); nearest 51 ulp (stuck).
  assert rms(stochastic) < 10.0
  assert abs(float(np.mean(stochastic))) < 1.0
  assert rms(nearest) > 4 * rms(stochastic)


def test_rounding_bits_differ_by_step_leaf_and_average():
  shape = (64, 64)
  seeds = [
    _core.rounding_seed(jnp.int32(0), 0, 0),
    _core.rounding_seed(jnp.int32(1), 0, 0),
    _core.rounding_seed(jnp.int32(0), 1, 0),
    _core.rounding_seed(jnp.int32(0), 0, 1),
  ]
  dithers = [np.asarray(_core.rounding_bits(shape, s)) & 0xFFFF for s in seeds]
  for i in range(len(dithers)):
    # Each dither is close to uniform on [0, 2**16) ...
    assert abs(dithers[i].mean() / 2**16 - 0.5) < 0.02
    for j in range(i):
      # ... and uncorrelated with the others.
      assert abs(np.corrcoef(dithers[i].ravel(), dithers[j].ravel())[0, 1]) < 0.05


def test_stochastic_rounding_is_identical_across_devices_and_runs():
  mesh = jax.make_mesh((8,), ("d",))
  rng = np.random.default_rng(1)
  params = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
  grads = [jnp.asarray(rng.normal(size=(16, 8)) * 1e-3, jnp.bfloat16) for _ in range(5)]
  tx = optax_ema.moving_average(
    optax.sgd(1.0), 0.999, ema_dtype=jnp.bfloat16, stochastic_rounding=True
  )

  def run(params, grads):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
      updates, state = step(g, state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(state.average.astype(jnp.float32))

  single = run(params, grads)
  sharding = NamedSharding(mesh, PartitionSpec("d", None))
  sharded = run(
    jax.device_put(params, sharding), [jax.device_put(g, sharding) for g in grads]
  )
  np.testing.assert_array_equal(single, sharded)
  np.testing.assert_array_equal(single, run(params, grads))


def test_stochastic_rounding_works_with_debias_and_several_decays():
  params = {"w": jnp.full(4, 1.5, jnp.bfloat16)}
  tx = optax_ema.moving_average(
    optax.sgd(0.0),
    {"fast": 0.9, "slow": 0.999},
    ema_dtype=jnp.bfloat16,
    stochastic_rounding=True,
    debias=True,
  )
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
  for key in ("fast", "slow"):
    avg = optax_ema.averaged_params(state, params, which=key)
    assert avg["w"].dtype == jnp.bfloat16
    # Constant params: the debiased average is the params, up to one place.
    np.testing.assert_allclose(np.asarray(avg["w"], np.float32), 1.5, atol=2.0**-6)


@pytest.mark.parametrize("ema_dtype", [None, jnp.float32, jnp.float64])
def test_stochastic_rounding_needs_a_low_precision_ema_dtype(ema_dtype):
  with pytest.raises(ValueError, match="`stochastic_rounding=True` needs"):
    optax_ema.moving_average(
      optax.sgd(1.0), 0.9, ema_dtype=ema_dtype, stochastic_rounding=True
    )


GUIDE = pathlib.Path(__file__).parent.parent / "docs" / "guides" / "low_precision.md"
STORAGE = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def _guide_table():
  """``{(decay, dtype name): warns}`` from the low-precision guide's table."""
  lines = GUIDE.read_text().splitlines()
  start = lines.index("| decay  | bfloat16 | float16 | float32 |")
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  table = {}
  for line in lines[start + 2 :]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    for name, cell in zip(header[1:], cells[1:], strict=True):
      assert cell in ("warns", "-"), cell
      table[(float(cells[0]), name)] = cell == "warns"
  return table


def _freezes_somewhere(decay, dtype):
  """The rule, from NumPy: a parameter moving by 1e-3 of its value moves its
  average by (1 - decay) * 1e-3 * |a|, below half a place of ``a`` for some
  magnitude ``|a|`` (a grid over eight binades)."""
  w = 1.0 - float(np.float32(decay))
  if not 0.0 < w < 1.0:
    return False
  mantissas = np.linspace(1.0, 2.0, 65)[:-1]
  a = np.concatenate([m * 2.0**k for k in range(-4, 4) for m in [mantissas]])
  a = a.astype(dtype)
  half_place = np.spacing(a).astype(np.float64) / 2
  return bool(np.any(w * 1e-3 * a.astype(np.float64) < half_place))


def test_guide_table_of_nearest_rounding_warnings_follows_the_rule():
  table = _guide_table()
  assert len(table) == 18
  for (decay, name), warns in table.items():
    assert _freezes_somewhere(decay, STORAGE[name]) == warns, (decay, name)


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_nearest_rounding_warns_exactly_where_the_guide_table_says(name):
  for (decay, dtype), warns in _guide_table().items():
    if dtype != name:
      continue
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      optax_ema.moving_average(
        optax.sgd(0.1), decay, ema_dtype=jnp.dtype(name), stochastic_rounding=False
      )
    messages = [str(r.message) for r in record if "will not move" in str(r.message)]
    assert bool(messages) == warns, (decay, name, messages)


@pytest.mark.parametrize(("decay", "warns"), [(0.51, False), (0.52, True)])
def test_float16_nearest_rounding_warns_from_a_decay_of_0_512(decay, warns):
  # (1 - decay) * 1e-3 < 2 ** -11 exactly when decay > 1 - 0.48828125.
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    optax_ema.moving_average(
      optax.sgd(0.1), decay, ema_dtype=jnp.float16, stochastic_rounding=False
    )
  assert bool(record) == warns
  assert _freezes_somewhere(decay, np.float16) == warns


def test_stochastic_rounding_never_warns_at_any_decay():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for dtype in (jnp.bfloat16, jnp.float16):
      optax_ema.moving_average(optax.sgd(0.1), 0.9999, ema_dtype=dtype)


@pytest.mark.parametrize("stochastic", [True, False])
def test_float16_average_beyond_its_range_is_nan_after_one_step(stochastic):
  # What the low-precision guide says: 70000 stored as float16 is inf at
  # init, and inf - (inf - x) * w is NaN from the first averaging step.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # nearest rounding warns at 0.9
    tx = optax_ema.moving_average(
      optax.identity(), 0.9, ema_dtype=jnp.float16, stochastic_rounding=stochastic
    )
  params = jnp.array([70000.0, 1.0], jnp.float32)
  state = tx.init(params)
  assert np.isinf(np.asarray(state.average)[0])
  _, state = tx.update(jnp.zeros(2), state, params)
  got = np.asarray(state.average, np.float32)
  assert np.isnan(got[0]) and got[1] == 1.0
