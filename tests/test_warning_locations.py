"""Every warning of the package points at the line of the user's code.

Each public entry point that can warn is called here, from this file (the
post-hoc ones, which need Orbax, from ``test_posthoc_warning_locations.py``): the
warning's ``filename`` must be this file, however many frames of the
package, of JAX (tracing under ``jit``, ``scan``) or of optax (``chain``,
``inject_hyperparams``) lie between this line and the one that warns.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_ema
from optax_ema import _warn

PARAMS = {"w": jnp.ones(3)}
BF16_NEAREST = {"ema_dtype": jnp.bfloat16, "stochastic_rounding": False}


def _one(record, category=UserWarning):
  """The one warning of ``category`` in ``record``."""
  (found,) = [r for r in record if issubclass(r.category, category)]
  return found


def test_the_helper_points_past_jax_tracing_under_jit():
  def step(x):
    _warn.warn("traced")
    return x

  with pytest.warns(UserWarning, match="traced") as record:
    jax.jit(step)(1.0)
  assert record[0].filename == __file__
  assert record[0].lineno == step.__code__.co_firstlineno + 1


def test_the_helper_points_past_scan_and_the_optax_chain():
  def init(params):
    _warn.warn("in init")
    return optax.EmptyState()

  tx = optax.chain(optax.GradientTransformation(init, lambda u, s, p=None: (u, s)))
  with pytest.warns(UserWarning, match="in init") as record:
    jax.lax.scan(lambda c, x: (tx.init(PARAMS) and c, x), 0.0, jnp.ones(2))
  assert record[0].filename == __file__


@pytest.mark.parametrize(
  "build",
  [
    lambda: optax_ema.moving_average(optax.sgd(0.1), 0.999, **BF16_NEAREST),
    lambda: optax_ema.moving_average(
      optax.sgd(0.1), {"a": 0.9, "b": lambda c: 0.999 * jnp.ones([])}, **BF16_NEAREST
    ),
    lambda: optax_ema.power_ema(optax.sgd(0.1), **BF16_NEAREST),
    lambda: optax_ema.moving_average("sgd", 0.999, **BF16_NEAREST),
  ],
  ids=["moving_average", "schedules", "power_ema", "by_name"],
)
def test_nearest_rounding_warnings_point_at_the_factory_call(build):
  with pytest.warns(UserWarning, match="stochastic_rounding") as record:
    build()
  assert all(r.filename == __file__ for r in record)


def test_a_nearest_rounding_warning_under_inject_hyperparams_points_at_init():
  injected = optax.inject_hyperparams(
    optax_ema.power_ema, static_args=("ema_dtype", "stochastic_rounding")
  )
  tx = injected(optax.sgd(0.1), **BF16_NEAREST)
  with pytest.warns(UserWarning, match="stochastic_rounding") as record:
    tx.init(PARAMS)
  assert record[0].filename == __file__


def test_a_traced_decay_warning_under_jit_points_at_the_jitted_call():
  injected = optax.inject_hyperparams(
    optax_ema.moving_average, static_args=("ema_dtype", "stochastic_rounding")
  )
  with pytest.warns(UserWarning, match="is traced") as record:
    tx = injected(optax.sgd(0.1), average_decay=0.9, **BF16_NEAREST)
    state = tx.init(PARAMS)
    jax.jit(tx.update)(PARAMS, state, PARAMS)
  assert [r.filename for r in record] == [__file__] * len(record)


@pytest.mark.parametrize("reader", ["averaged_params", "diagnostics"])
def test_a_state_not_last_in_its_chain_warns_at_the_readers_call(reader):
  tx = optax.chain(optax_ema.moving_average(optax.sgd(0.1), 0.9), optax.scale(0.5))
  state = tx.init(PARAMS)
  with pytest.warns(UserWarning, match="not last") as record:
    if reader == "averaged_params":
      optax_ema.averaged_params(state)
    else:
      optax_ema.diagnostics(state, PARAMS)
  assert record[0].filename == __file__


def test_the_deprecated_tx_of_diagnostics_warns_at_the_call():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9)
  with pytest.warns(DeprecationWarning, match="no longer needs") as record:
    optax_ema.diagnostics(tx.init(PARAMS), PARAMS, tx)
  assert record[0].filename == __file__


@pytest.mark.parametrize(
  "build",
  [
    lambda: optax_ema.moving_average("sgd", 0.9, lr=0.1),
    lambda: optax_ema.power_ema("adam", lr=0.1),
    lambda: optax_ema.swa("sgd", lr=0.1),
    lambda: optax_ema.MovingAverage("sgd", lr=0.1),
    lambda: optax_ema.SWA("sgd", lr=0.1),
  ],
  ids=["moving_average", "power_ema", "swa", "MovingAverage", "SWA"],
)
def test_kerass_deprecated_lr_warns_at_the_call(build):
  with pytest.warns(DeprecationWarning, match="`lr` is deprecated") as record:
    build()
  assert record[0].filename == __file__


@pytest.mark.parametrize(
  "build",
  [
    lambda: optax_ema.moving_average("sgd", 0.9, decay=0.01),
    lambda: optax_ema.MovingAverage("sgd", decay=0.01),
  ],
  ids=["function", "class"],
)
def test_kerass_learning_rate_decay_warns_at_the_call(build):
  with pytest.warns(UserWarning, match="legacy learning-rate decay") as record:
    build()
  assert record[0].filename == __file__


def test_assign_average_vars_warns_at_the_call_for_variables_without_average():
  opt = optax_ema.MovingAverage("sgd", average_decay=0.5)
  params = opt.apply_gradients(({"w": jnp.ones(3)}, PARAMS))
  with pytest.warns(UserWarning, match="have no average") as record:
    opt.assign_average_vars({**params, "new": jnp.ones(2)})
  assert record[0].filename == __file__
