"""Plain ``pytest`` is the fast run; the README's test command runs every test.

The fast run leaves out the tests marked ``subprocess``, ``sphinx``,
``notebook``, ``orbax`` or ``multiprocess`` (``addopts`` in pyproject.toml),
and nothing else; the README's command (which CI runs) and the second
OpenBLAS kernel's run in ``.ci/run`` lift that selection.
"""

import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tomllib

import pytest
from _pytest.mark.expression import Expression

import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLOW = {"subprocess", "sphinx", "notebook", "orbax", "multiprocess"}
PYTEST = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
  "pytest"
]["ini_options"]


def _marker_option(argv):
  """The ``-m`` expression a pytest command line ends up with (None: no -m)."""
  found = None
  for flag, value in itertools.pairwise(argv):
    if flag == "-m":
      found = value
  return found


def _selects(expression, markers):
  """Whether ``-m expression`` selects a test carrying ``markers``."""
  if not expression:  # no -m, or -m "": no selection by marker
    return True
  return Expression.compile(expression).evaluate(lambda name, **_: name in markers)


def _readme_pytest_argv():
  readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
  command = readme[readme.index("<!-- test-command -->") + 2]
  (run,) = [c for c in command.split(" && ") if c.startswith(".venv/bin/pytest")]
  return shlex.split(run)


def _every_combination():
  names = sorted(SLOW)
  return [
    set(combo) | {"parametrize"}
    for n in range(len(names) + 1)
    for combo in itertools.combinations(names, n)
  ]


def test_the_slow_markers_are_registered_and_guarded():
  registered = {line.split(":")[0] for line in PYTEST["markers"]}
  assert registered == SLOW
  assert set(conftest.PROCESS_MARKERS) | {"orbax"} == SLOW


def test_plain_pytest_leaves_out_exactly_the_slow_markers():
  default = _marker_option(shlex.split(PYTEST["addopts"]))
  for markers in _every_combination():
    assert _selects(default, markers) == (not markers & SLOW), markers


def test_the_readme_command_runs_every_test():
  argv = _readme_pytest_argv()
  assert _marker_option(argv) == ""
  for markers in _every_combination():
    assert _selects(_marker_option(argv), markers), markers


def test_ci_runs_the_prescott_files_whole():
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  (line,) = [x for x in ci.splitlines() if "OPENBLAS_CORETYPE=Prescott" in x]
  assert _marker_option(shlex.split(line.rstrip("\\"))) == ""


def test_an_unmarked_test_cannot_start_a_python_process():
  with pytest.raises(conftest.UnmarkedTestError, match=r"`@pytest\.mark\.subprocess`"):
    subprocess.run([sys.executable, "-c", "pass"], check=False)


def test_an_unmarked_test_may_run_other_programs():
  # platform.processor() runs `uname -p`, for one.
  assert subprocess.run(["uname"], capture_output=True, check=False).returncode == 0


def test_an_unmarked_test_cannot_open_an_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  with pytest.raises(conftest.UnmarkedTestError, match=r"`@pytest\.mark\.orbax`"):
    ocp.CheckpointManager(tmp_path)


@pytest.mark.subprocess
def test_a_marked_test_starts_python_processes():
  subprocess.run([sys.executable, "-c", "pass"], check=True)


def _collect(tmp_path, name, *args):
  """What ``pytest --collect-only`` with ``args`` selects and leaves out."""
  report = tmp_path / f"{name}.json"
  path = [str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(path),
    "SELECTION_REPORT": str(report),
  }
  pytest_argv = ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
  subprocess.run(
    [sys.executable, *pytest_argv, "-p", "selection_report", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    check=True,
    timeout=600,
  )
  return json.loads(report.read_text(encoding="utf-8"))


@pytest.mark.subprocess
def test_collections_of_the_readme_command_and_of_plain_pytest(tmp_path):
  everything = _collect(tmp_path, "readme", *_readme_pytest_argv()[1:])
  fast = _collect(tmp_path, "plain")
  assert everything["deselected"] == []
  ids = lambda entries: {e["id"] for e in entries}
  assert ids(fast["selected"]) | ids(fast["deselected"]) == ids(everything["selected"])
  assert all(not SLOW & set(e["markers"]) for e in fast["selected"])
  assert all(SLOW & set(e["markers"]) for e in fast["deselected"])
  assert fast["deselected"]  # the slow tests exist, and are marked
