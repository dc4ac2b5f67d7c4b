"""The state types and their layouts.

States pickled before the layouts moved to one module still load, as the
same public classes, and training continues from them. The modules that
read states (``_reading``, ``_upgrade``, ``compat``, ``posthoc``) know them
through their layouts only: they import no transformation's module.
"""

import ast
import pathlib
import pickle
import sys

import jax
import optax
import pytest

import optax_ema

_PACKAGE = pathlib.Path(optax_ema.__file__).resolve().parent
sys.path.insert(0, str(pathlib.Path(__file__).with_name("pickles")))

import make as pickles  # noqa: E402  (tests/pickles/make.py)


@pytest.mark.parametrize("name", sorted(pickles.CONFIGS))
def test_a_state_pickled_by_the_previous_layout_loads_and_trains_on(name):
  make, state_type = pickles.CONFIGS[name]
  state = pickle.loads((pickles.ROOT / f"{name}.pkl").read_bytes())
  assert type(state) is getattr(optax_ema, state_type)
  tx = make()
  fresh = tx.init(pickles.PARAMS)
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  assert int(state.count) == pickles.STEPS
  _, after = tx.update(pickles.GRADS, state, pickles.PARAMS)
  assert int(after.count) == pickles.STEPS + 1


def test_a_state_pickles_under_the_module_users_import_it_from():
  # So that a pickle written now loads in earlier versions too.
  state = optax_ema.swa(optax.sgd(0.1)).init(pickles.PARAMS)
  assert b"optax_ema._swa" in pickle.dumps(state)
  assert b"optax_ema._states" not in pickle.dumps(state)


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
