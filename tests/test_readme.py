"""The README's promises: its code runs, and its two commands are the real ones."""

import pathlib
import subprocess

import pytest
from markdown_blocks import python_blocks
from markdown_blocks import run_python_block

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = python_blocks(README)


def _command_after(marker: str) -> str:
  lines = README.splitlines()
  index = lines.index(f"<!-- {marker} -->")
  return lines[index + 2].removeprefix("$ ")  # skip the ```bash fence


def test_readme_has_a_quickstart_that_shows_its_output():
  # The other examples live in the guides (tests/test_guides.py runs them).
  quickstart = PYTHON_BLOCKS[0]
  assert "optax_ema.moving_average(" in quickstart.source
  assert "optax_ema.averaged_params(" in quickstart.source
  assert quickstart.expected_output is not None


@pytest.mark.parametrize(
  "block", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_readme_python_block_runs(block, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run_python_block(block, "README.md")


def test_readme_has_exactly_two_setup_commands():
  assert README.count("<!-- demo-command -->") == 1
  assert README.count("<!-- test-command -->") == 1
  demo = _command_after("demo-command")
  test = _command_after("test-command")
  assert demo.startswith("python3 -m venv .venv && ")
  assert demo.endswith("python -m optax_ema.demo")
  assert test.startswith("python3 -m venv .venv && ")
  for step in ("pip install", "ruff check", "ruff format --check", "pytest"):
    assert step in test
  # The suite builds the documentation, so the test command installs it too.
  assert 'pip install -e ".[test,docs]"' in test


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  (line,) = [x for x in ci.splitlines() if x.startswith("cmd=$(")]
  out = subprocess.run(
    ["bash", "-c", f'{line}; printf %s "$cmd"'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert out == _command_after("test-command")
