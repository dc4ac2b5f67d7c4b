"""The step sizes ``w = 1 - decay`` of every averaging rule.

Where ``1 - decay`` would be formed from a float32 decay near one, the rules
compute ``w`` directly: a power schedule through ``moving_average`` is as
precise as ``power_ema``, and ``update_every``'s product of decays keeps its
precision. TFA's own rule stays TFA's float32 arithmetic, bit for bit.
Expected values: float64 NumPy from the closed forms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import _rules
from optax_ema import schedules


def _power_w64(count, gamma):
  t = count + 1
  return -np.expm1((gamma + 1) * np.log1p(-1 / t))


@pytest.mark.parametrize("count", [10, 10**4, 10**7])
def test_a_power_schedule_gives_w_to_float32_precision_at_any_count(count):
  gamma = optax_ema.posthoc.sigma_rel_to_gamma(0.1)
  rule = _rules.Decay(schedules.power(sigma_rel=0.1))
  step = rule.step(jnp.asarray(count, jnp.int32))
  want = _power_w64(count, gamma)
  assert abs(float(step.weight()) / want - 1) < 2e-6
  # 1 - decay in float32 is what a decay-valued schedule would give: at 1e7
  # it is percents off.
  naive = 1.0 - float(step.decay)
  if count == 10**7:
    assert abs(naive / want - 1) > 1e-2


def test_moving_average_with_a_power_schedule_steps_like_power_ema_at_1e7():
  # One step from count 1e7, from the same average towards the same params.
  count = 10**7
  params = {"w": jnp.linspace(-1.0, 1.0, 8)}
  average = {"w": jnp.zeros(8)}
  ema = optax_ema.moving_average(optax.identity(), schedules.power(sigma_rel=0.1))
  power = optax_ema.power_ema(optax.identity(), sigma_rels=(0.1,))
  s1 = ema.init(params)._replace(average=average, count=jnp.asarray(count, jnp.int32))
  s2 = power.init(params)._replace(
    averages={"0.1": average}, count=jnp.asarray(count, jnp.int32)
  )
  zeros = {"w": jnp.zeros(8)}
  _, s1 = jax.jit(ema.update)(zeros, s1, params)
  _, s2 = jax.jit(power.update)(zeros, s2, params)
  np.testing.assert_array_equal(s1.average["w"], s2.averages["0.1"]["w"])
  gamma = optax_ema.posthoc.sigma_rel_to_gamma(0.1)
  want = np.asarray(params["w"], np.float64) * _power_w64(count, gamma)
  np.testing.assert_allclose(s1.average["w"], want, rtol=2e-6)


@pytest.mark.parametrize(("decay", "k"), [(0.9999, 10), (0.99999, 100), (0.5, 3)])
def test_update_every_product_keeps_the_precision_of_w(decay, k):
  rule = _rules.Every(_rules.Decay(decay), k)
  step = rule.step(jnp.asarray(k - 1, jnp.int32))
  d32 = float(np.float32(decay))
  want = -np.expm1(k * np.log1p(-(1 - d32)))  # 1 - d32 ** k, in float64
  assert abs(float(step.weight()) / want - 1) < 2e-6
  assert float(step.decay) == pytest.approx(d32**k, rel=1e-6)


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"num_updates": 5},
    {"start_step": 3},
    {"dynamic_decay": True},
    {"num_updates": 30, "start_step": 2, "dynamic_decay": True},
  ],
  ids=str,
)
def test_tfa_rule_is_tfas_float32_arithmetic_bit_for_bit(kwargs):
  f32 = np.float32
  rule = _rules.Decay(0.99, **kwargs)
  for t in range(12):
    decay = f32(0.99)
    if "num_updates" in kwargs:
      n = f32(kwargs["num_updates"])
      decay = min(decay, (f32(1) + n) / (f32(10) + n))
    start = kwargs.get("start_step", 0)
    if kwargs.get("dynamic_decay"):
      since = f32(t) - f32(start)
      decay = min(decay, (f32(1) + since) / (f32(10) + since))
    if t < start:
      decay = f32(0)
    step = rule.step(jnp.asarray(t, jnp.int32))
    assert np.float32(step.decay) == decay, t
    assert step.exact is None  # w = 1 - decay in the average's own dtype
    assert np.float32(step.weight()) == f32(1) - decay


def test_w_is_formed_in_the_average_dtype_for_float64():
  # TFA casts the float32 decay to the variable's dtype before 1 - decay.
  with jax.enable_x64(True):
    step = _rules.Decay(0.1).step(jnp.asarray(0, jnp.int32))
    w = step.weight(jnp.float64)
  assert float(w) == 1.0 - float(np.float32(0.1))
  assert float(w) != float(np.float32(1.0 - np.float32(0.1)))


def test_swa_rule_is_an_exact_running_mean_in_float64():
  rule = _rules.RunningMean(2, 3)
  with jax.enable_x64(True):
    for count, mean_of in [(0, 1), (1, 1), (2, 1), (5, 2), (8, 3), (11, 4)]:
      step = rule.step(jnp.asarray(count, jnp.int32))
      assert float(step.weight(jnp.float64)) == 1.0 / mean_of, count
  assert [bool(rule.gate(jnp.asarray(c))) for c in range(9)] == [
    True, True, True, False, False, True, False, False, True
  ]  # fmt: skip


@pytest.mark.parametrize(
  "schedule",
  [
    schedules.warmup(0.9999, power=0.75),
    schedules.warmup(0.999, inv_gamma=10.0, min_decay=0.5, start_step=3),
    schedules.tf_ramp(0.999),
    schedules.half_life(2000.0),
    schedules.power(sigma_rel=0.05),
  ],
  ids=["warmup", "warmup_min_start", "tf_ramp", "half_life", "power"],
)
def test_every_schedule_step_size_is_one_minus_its_decay(schedule):
  counts = jnp.asarray([0, 1, 2, 7, 100, 10**4, 10**6], jnp.int32)
  decay = np.asarray(jax.vmap(schedule)(counts), np.float64)
  w = np.asarray(jax.vmap(schedule.step_size)(counts), np.float64)
  # 1 - decay agrees to the rounding of the float32 decay near one.
  np.testing.assert_allclose(w, 1 - decay, rtol=0, atol=1.2e-7)
  assert np.all((w >= 0) & (w <= 1))
