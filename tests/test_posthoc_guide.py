"""docs/guides/posthoc.md: its code runs, its commands work, its tables are measured.

The ```python blocks run in order in one namespace (a fresh working
directory), then the ```console commands run against what they wrote. The
accuracy and memory tables must be the ones benchmarks/bench_posthoc.py
wrote to benchmarks/results/bench_posthoc.md.
"""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from optax_ema.posthoc import _writer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "guides" / "posthoc.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "benchmarks" / "results" / "bench_posthoc.md").read_text(
  encoding="utf-8"
)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE, flags=re.DOTALL)
COMMANDS = [
  line.removeprefix("$ ")
  for block in re.findall(r"```console\n(.*?)```", GUIDE, flags=re.DOTALL)
  for line in block.splitlines()
  if line.startswith("$ ")
]


def _tables(text):
  """The Markdown tables of ``text``, each as one string."""
  tables, current = [], []
  for line in [*text.splitlines(), ""]:
    if line.startswith("|"):
      current.append(line)
    elif current:
      tables.append("\n".join(current))
      current = []
  return tables


def test_guide_has_a_complete_example_and_commands():
  assert len(PYTHON_BLOCKS) >= 4
  assert "SnapshotWriter" in PYTHON_BLOCKS[0] and "reconstruct" in PYTHON_BLOCKS[1]
  assert len(COMMANDS) == 2


@pytest.mark.orbax
@pytest.mark.subprocess
def test_guide_code_and_commands_run(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__guide__"}
  try:
    for i, source in enumerate(PYTHON_BLOCKS):
      exec(compile(source, f"posthoc.md, block {i}", "exec"), namespace)
  finally:
    _writer._close_all()
  printed = capsys.readouterr().out
  assert printed.count("sigma_rel=") == 3
  for command in COMMANDS:
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "optax_ema.posthoc"]
    proc = subprocess.run(
      [sys.executable, *argv[1:]],
      capture_output=True,
      text=True,
      check=False,
      timeout=120,
    )
    assert proc.returncode == 0, f"{command}:\n{proc.stderr[-2000:]}"
  assert (tmp_path / "ema_007").is_dir()


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_guide_tables_are_the_benchmark_results(index):
  results = _tables(RESULTS)
  assert len(results) == 4  # solver, accuracy, memory and time, bounds
  assert results[index] in _tables(GUIDE)


def test_guide_error_figure_is_the_benchmark_result():
  rows = [r for r in _tables(RESULTS)[2].splitlines()[2:] if r.split("|")[-2].strip()]
  worst = max(float(r.split("|")[-2]) for r in rows)
  assert f"at most {worst:.1e} (absolute" in " ".join(GUIDE.split())
