"""Test-wide configuration: eight fake CPU devices, and the fast run's guard.

The JAX configuration is set before any JAX backend starts, so the
multi-device tests (pmap, sharded jit) see a 2x4 mesh on a CPU-only machine;
single-device tests are unaffected (they run on device 0).

A plain ``pytest`` runs the fast subset: ``addopts`` in pyproject.toml
deselects the tests marked ``subprocess``, ``sphinx``, ``notebook``,
``orbax`` or ``multiprocess`` (``pytest -m ""`` runs them all). So that a test
cannot slip into the fast run by mistake, a test without the marker fails
when it starts a Python process or an Orbax checkpointer, with a message
naming the marker to add.
"""

import contextlib
import multiprocessing.process
import os
import subprocess
import sys

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# The markers that allow a test to start a Python process.
PROCESS_MARKERS = ("subprocess", "sphinx", "notebook", "multiprocess")
# The classes every Orbax checkpoint is written or read through.
ORBAX_CLASSES = (
  "CheckpointManager",
  "Checkpointer",
  "AsyncCheckpointer",
  "StandardCheckpointer",
  "PyTreeCheckpointer",
  "PyTreeCheckpointHandler",
  "StandardCheckpointHandler",
  "JsonCheckpointHandler",
)


class UnmarkedTestError(RuntimeError):
  """A test does what only tests with a marker may do."""


def _refusal(what: str, marker: str, others: tuple[str, ...] = ()):
  """A function that raises :class:`UnmarkedTestError` naming the marker."""
  also = "".join(f" or `{name}`" for name in others)
  message = (
    f"this test {what}: mark it `@pytest.mark.{marker}`{also} (see conftest.py), "
    "so that a plain `pytest`, the fast run, leaves it out"
  )

  def refuse(*args, **kwargs):
    raise UnmarkedTestError(message)

  return refuse


def _is_python(args, executable) -> bool:
  """Whether a ``Popen`` starts a Python interpreter (directly or by a shell)."""
  if isinstance(args, (str, bytes, os.PathLike)):
    first = os.fsdecode(args).split()[0]  # a shell command's program too
  else:
    first = os.fsdecode(args[0])
  programs = [first] + ([os.fsdecode(executable)] if executable else [])
  python = os.path.realpath(sys.executable)
  return any(
    os.path.basename(p).startswith("python") or os.path.realpath(p) == python
    for p in programs
  )


def _guard_processes(monkeypatch) -> None:
  """Refuses Python processes (``subprocess``) and ``multiprocessing``."""
  start = subprocess.Popen._execute_child
  refuse = _refusal("starts a Python process", "subprocess", PROCESS_MARKERS[1:])

  def execute_child(self, args, executable, *rest, **kwargs):
    if _is_python(args, executable):
      refuse()
    return start(self, args, executable, *rest, **kwargs)

  monkeypatch.setattr(subprocess.Popen, "_execute_child", execute_child)
  fork = _refusal("starts a process", "multiprocess")
  monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", fork)


def _guard_orbax(monkeypatch) -> None:
  """Refuses Orbax's checkpointers and handlers (where Orbax is installed)."""
  try:
    import orbax.checkpoint as ocp
  except ImportError:
    return
  refuse = _refusal("writes or reads an Orbax checkpoint", "orbax")
  for name in ORBAX_CLASSES:
    cls = getattr(ocp, name, None)
    if cls is not None:
      monkeypatch.setattr(cls, "__init__", refuse)


@contextlib.contextmanager
def _guarded(item):
  """Refuses, while ``item`` sets up and runs, what only its markers allow.

  Around the setup too, so that a module-scoped fixture that writes
  checkpoints is caught when the first (unmarked) test using it sets it up.
  """
  markers = {mark.name for mark in item.iter_markers()}
  with pytest.MonkeyPatch.context() as monkeypatch:
    if not markers.intersection(PROCESS_MARKERS):
      _guard_processes(monkeypatch)
    if "orbax" not in markers:
      _guard_orbax(monkeypatch)
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
  with _guarded(item):
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  with _guarded(item):
    return (yield)


def _doctest_writes_checkpoints(item) -> bool:
  """Whether an item is a doctest that writes files (Orbax checkpoints, here)."""
  doctest = getattr(item, "dtest", None)
  if doctest is None:
    return False
  source = "".join(example.source for example in doctest.examples)
  return "tempfile" in source or "import orbax" in source


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items):
  """Marks ``orbax`` the doctests that write or read Orbax checkpoints."""
  for item in items:
    if _doctest_writes_checkpoints(item):
      item.add_marker(pytest.mark.orbax)
