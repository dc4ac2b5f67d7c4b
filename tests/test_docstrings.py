"""Every public name has a docstring with a runnable example.

The examples themselves run as doctests (``--doctest-modules``); this checks
that each name in ``optax_ema.__all__`` has one at all. A public submodule
needs a docstring, and each of its public names (its ``__all__``, else the
functions and classes it defines) an example.
"""

import importlib
import inspect
import pkgutil

import pytest

import optax_ema


def _module_names(module):
  """A submodule's public names: its ``__all__``, else what it defines."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [
    name
    for name, value in vars(module).items()
    if not name.startswith("_")
    and (inspect.isfunction(value) or inspect.isclass(value))
    and value.__module__.startswith(module.__name__)
  ]


def _public_names():
  names = [(name, getattr(optax_ema, name)) for name in optax_ema.__all__]
  names = [(name, obj) for name, obj in names if not inspect.ismodule(obj)]
  # Every public submodule, exported by name or only importable (compat).
  for info in pkgutil.iter_modules(optax_ema.__path__):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"optax_ema.{info.name}")
    names.append((info.name, module))
    names += [
      (f"{info.name}.{sub}", getattr(module, sub)) for sub in _module_names(module)
    ]
  return names


PUBLIC = _public_names()


def test_all_names_are_exported():
  assert len(set(optax_ema.__all__)) == len(optax_ema.__all__)
  for name in optax_ema.__all__:
    assert hasattr(optax_ema, name), name


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_name_has_a_docstring_with_an_example(name, obj):
  doc = inspect.getdoc(obj)
  assert doc, f"optax_ema.{name} has no docstring"
  if inspect.ismodule(obj):
    return  # a module's names are checked one by one
  assert "Examples" in doc, f"optax_ema.{name}: docstring has no Examples section"
  assert ">>>" in doc, f"optax_ema.{name}: docstring has no doctest (>>>)"
