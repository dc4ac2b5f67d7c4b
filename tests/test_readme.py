"""The README's promises: its code runs, and its two commands are the real ones."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def _command_after(marker: str) -> str:
  lines = README.splitlines()
  index = lines.index(f"<!-- {marker} -->")
  return lines[index + 2].removeprefix("$ ")  # skip the ```bash fence


def test_readme_has_python_examples():
  assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize(
  "source", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_readme_python_block_runs(source, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__readme__"}
  exec(compile(source, "README.md", "exec"), namespace)


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
