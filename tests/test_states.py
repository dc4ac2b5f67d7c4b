"""The state types and their layouts.

States pickled before the layouts moved to one module still load, as the
same public classes, and training continues from them. The modules that
read states (``_reading``, ``_upgrade``, ``compat``, ``posthoc``) know them
through their layouts only: they import no transformation's module.
"""

import ast
import pathlib
import pickle

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_ema
from optax_ema import schedules

_PICKLES = pathlib.Path(__file__).resolve().parent / "pickles"
_PACKAGE = pathlib.Path(optax_ema.__file__).resolve().parent

# The configurations of tests/pickles/make.py, and the state type each makes.
_PARAMS = {
  "w": jnp.arange(3.0),
  "b": jnp.ones(2, jnp.bfloat16),
  "n": jnp.asarray(4, jnp.int32),
}
_CASES = {
  "moving_average": (
    lambda: optax_ema.moving_average(optax.sgd(0.1), 0.9),
    optax_ema.MovingAverageState,
  ),
  "moving_average_several_debiased": (
    lambda: optax_ema.moving_average(
      optax.sgd(0.1),
      {"fast": 0.9, "slow": schedules.power(sigma_rel=0.1)},
      debias=True,
    ),
    optax_ema.MovingAverageState,
  ),
  "moving_average_per_leaf": (
    lambda: optax_ema.moving_average(
      optax.sgd(0.1),
      schedules.per_leaf({"w": 0.9, "b": 0.5, "n": 0.9}),
      debias=True,
    ),
    optax_ema.MovingAverageState,
  ),
  "power_ema": (
    lambda: optax_ema.power_ema(optax.sgd(0.1), sigma_rels=(0.05, 0.1)),
    optax_ema.PowerEmaState,
  ),
  "swa": (
    lambda: optax_ema.swa(optax.sgd(0.1), start_averaging=1, average_period=2),
    optax_ema.SWAState,
  ),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_a_state_pickled_by_the_previous_layout_loads_and_trains_on(name):
  make, state_type = _CASES[name]
  state = pickle.loads((_PICKLES / f"{name}.pkl").read_bytes())
  assert type(state) is state_type
  tx = make()
  fresh = tx.init(_PARAMS)
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  assert int(state.count) == 3
  grads = jax.tree.map(jnp.zeros_like, _PARAMS)
  _, after = tx.update(grads, state, _PARAMS)
  assert int(after.count) == 4


@pytest.mark.parametrize(
  ("module", "name"),
  [
    ("optax_ema._moving_average", "MovingAverageState"),
    ("optax_ema._power_ema", "PowerEmaState"),
    ("optax_ema._swa", "SWAState"),
  ],
)
def test_state_classes_keep_their_import_path(module, name):
  imported = __import__(module, fromlist=[name])
  assert getattr(imported, name) is getattr(optax_ema, name)


_FACTORIES = {"_moving_average", "_power_ema", "_swa"}
_READERS = ["_reading.py", "_upgrade.py", "_diagnostics.py", "compat", "posthoc"]


def _imported_modules(path):
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module.split(".")[-1])
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name.split(".")[-1] for a in node.names)
  return names


@pytest.mark.parametrize("reader", _READERS)
def test_readers_of_states_import_no_transformation_module(reader):
  target = _PACKAGE / reader
  files = sorted(target.glob("*.py")) if target.is_dir() else [target]
  for path in files:
    if path.name == "_by_name.py" or path.name == "_classes.py":
      continue  # the by-name edge and Keras's classes wrap the factories
    assert not (_imported_modules(path) & _FACTORIES), path.name
