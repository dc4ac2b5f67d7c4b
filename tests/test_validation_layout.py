"""Validation in one place: one way in, each value checked once, one warner.

Also the split between the core and its edge: the core's messages and
docstrings speak of transformations only, and the edge that takes
optimizers by name adds its own words, so that what users read through
``optax_ema.moving_average`` and friends is what it always was.
"""

import ast
import pathlib

import jax.numpy as jnp
import optax
import pytest

import optax_ema
from optax_ema import _moving_average
from optax_ema import _power_ema
from optax_ema import _swa

PACKAGE = pathlib.Path(optax_ema.__file__).parent
PARAMS = {"w": jnp.ones(3)}


def _imports(path):
  """The modules ``path`` imports (``from optax_ema import x`` as ``x``)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.ImportFrom):
      names.add(node.module or "")
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
  return names


@pytest.mark.parametrize(
  "module",
  ["_rules", "_averages", "_tree_utils", "_power_math", "_inner_state", "_warn"],
)
def test_the_layers_validation_reads_never_call_back_into_it(module):
  imported = _imports(PACKAGE / f"{module}.py")
  assert not any("_validation" in name for name in imported), imported


def _sources():
  return [p for p in PACKAGE.rglob("*.py") if p.name != "_warn.py"]


def test_no_warning_is_raised_with_a_hand_counted_stack_level():
  for path in _sources():
    text = path.read_text(encoding="utf-8")
    assert "stacklevel" not in text, path
    assert "warnings.warn(" not in text, path  # optax_ema._warn.warn instead


def _counting_schedule():
  calls = []

  def schedule(count):
    calls.append(count)
    return jnp.full(jnp.shape(count), 0.999, jnp.float32)

  return schedule, calls


def test_a_schedule_is_evaluated_once_for_every_check_that_reads_it():
  # Its output type once (eval_shape), its values once (one vmap): the range
  # check, the debias check and the rounding warning share the samples.
  schedule, calls = _counting_schedule()
  with pytest.warns(UserWarning, match="a schedule"):
    optax_ema.moving_average(
      optax.sgd(0.1),
      schedule,
      debias=True,
      ema_dtype=jnp.bfloat16,
      stochastic_rounding=False,
    )
  assert len(calls) == 2


def test_a_schedule_given_for_two_averages_is_checked_once():
  schedule, calls = _counting_schedule()
  optax_ema.moving_average(optax.sgd(0.1), {"a": schedule, "b": schedule})
  assert len(calls) == 2


NOT_A_TRANSFORMATION = (
  "`optimizer` must be an optax.GradientTransformation (an object with `init` "
  "and `update`){}, got int: 3."
)


@pytest.mark.parametrize("name", ["moving_average", "power_ema", "swa"])
def test_the_public_factories_say_an_optimizer_may_be_a_name(name):
  with pytest.raises(TypeError) as err:
    getattr(optax_ema, name)(3)
  by_name = " or the name of an optax optimizer such as 'adam'"
  assert str(err.value) == NOT_A_TRANSFORMATION.format(by_name)


@pytest.mark.parametrize("core", [_moving_average, _power_ema, _swa])
def test_the_core_factories_speak_of_transformations_only(core):
  factory = getattr(core, core.__name__.removeprefix("optax_ema._"))
  with pytest.raises(TypeError) as err:
    factory(3)
  assert str(err.value) == NOT_A_TRANSFORMATION.format("")
  assert "name of an optax" not in factory.__doc__
  assert "optimizer: the optax transformation to wrap.\n" in factory.__doc__


@pytest.mark.parametrize(
  "name, example",
  [
    (
      "moving_average",
      "optax_ema.moving_average(optax.adam(1e-3), average_decay=0.999)",
    ),
    ("power_ema", "optax_ema.power_ema(optax.adam(1e-3))"),
    ("swa", "optax_ema.swa(optax.adam(1e-3))"),
  ],
)
def test_optax_ema_as_the_optimizer_is_refused_with_the_factorys_example(name, example):
  with pytest.raises(ValueError) as err:
    getattr(optax_ema, name)(optax.ema(0.9)).init(PARAMS)
  assert str(err.value) == (
    "`optimizer` is (or ends with) optax.ema, which averages the updates (a "
    "momentum of the gradients) and returns them as the step: training would "
    f"climb the loss. {name} keeps the average of the parameters itself; wrap "
    f"the optimizer you train with, e.g. `{example}`."
  )


@pytest.mark.parametrize("name", ["moving_average", "power_ema", "swa"])
def test_the_public_docstrings_document_optimizers_by_name(name):
  doc = getattr(optax_ema, name).__doc__
  assert "optimizer: the optax transformation to wrap, or the name of an optax" in doc
  assert "optimizer: the optax transformation to wrap.\n" not in doc
