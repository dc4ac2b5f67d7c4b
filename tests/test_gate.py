"""The one gate of the package: a cond on CPU, a while loop on GPU and TPU.

On TPU a gate that carries host memory (``offload``) is a cond.

The formulation is chosen per lowering platform, so lowering the same step
for another platform (no such device needed) shows which one it gets; both
formulations, forced on CPU, give the same numbers as NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ema
from optax_ema import _gate

import helpers

CONFIGS = {
  "update_every": lambda: optax_ema.moving_average(optax.sgd(0.1), 0.9, update_every=3),
  "skip_nonfinite": lambda: optax_ema.moving_average(
    optax.sgd(0.1), 0.9, skip_nonfinite=True
  ),
  "multisteps": lambda: optax_ema.moving_average(
    optax.MultiSteps(optax.sgd(0.1), 2), 0.9
  ),
  "swa": lambda: optax_ema.swa(optax.sgd(0.1), 1, 3),
}


def _lowered(tx, platform):
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)

  def step(params, state, grads):
    return tx.update(grads, state, params)

  traced = jax.jit(step).trace(params, state, params)
  return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gpu_and_tpu_lowerings_gate_with_a_loop_and_cpu_with_a_conditional(config):
  tx = CONFIGS[config]()
  for platform in ("cuda", "tpu"):
    assert "stablehlo.while" in _lowered(tx, platform)
  assert "stablehlo.while" not in _lowered(tx, "cpu")


def test_an_offloaded_average_is_gated_by_a_conditional_on_tpu():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, update_every=3, offload=True)
  assert "stablehlo.while" not in _lowered(tx, "tpu")
  assert "stablehlo.case" in _lowered(tx, "tpu")
  assert "stablehlo.while" in _lowered(tx, "cuda")


def test_forced_formulations_compile_to_one_construct_on_cpu(monkeypatch):
  tx = CONFIGS["update_every"]()
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  for form, want, other in (
    ("while", " while(", " conditional("),
    ("cond", " conditional(", " while("),
  ):
    monkeypatch.setattr(_gate, "FORCE", form)

    def step(params, state, grads):  # a new function: no cached trace
      return tx.update(grads, state, params)

    text = jax.jit(step).lower(params, state, params).compile().as_text()
    assert want in text and other not in text, form


@pytest.mark.parametrize("form", ["while", "cond", None])
def test_every_formulation_averages_on_the_grid_only(form, monkeypatch):
  monkeypatch.setattr(_gate, "FORCE", form)
  tx = CONFIGS["update_every"]()
  params = {"w": jnp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))}
  grads = helpers.grads(7, seed=2, like=params)
  final, state = helpers.run(tx, params, grads)
  p = np.asarray(params["w"], np.float64)
  a = p.copy()
  for t, g in enumerate(grads):
    p = p - 0.1 * np.asarray(g["w"], np.float64)
    if (t + 1) % 3 == 0:
      a = 0.9**3 * a + (1 - 0.9**3) * p
  np.testing.assert_allclose(state.average["w"], a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(final["w"], p, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 7


def test_overwrite_on_device_is_a_select_without_a_gate():
  tx = optax_ema.moving_average(optax.adam(0.05), 0.9, overwrite_every=2)
  params = {"w": jnp.ones((64, 32))}
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  text = compiled.as_text()
  assert " conditional(" not in text and " while(" not in text
  # A conditional held the updates and the average in buffers of their own
  # (two parameter-sized temporaries); XLA:CPU, which does not fuse siblings,
  # now keeps at most one (GPU and TPU none: tests_aot/).
  assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * 64 * 32 * 4
