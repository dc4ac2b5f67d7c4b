"""docs/guides/sharded_training.md runs in order and prints what it shows.

Its ```python blocks are one session (each uses the names of the ones
before), so they run in order in one namespace, in a fresh working
directory (the Orbax checkpoint is written there); a block followed by a
```text block must print exactly that text.
"""

import contextlib
import io
import pathlib

import pytest
from markdown_blocks import python_blocks

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs/guides/sharded_training.md"


def _lines(text):
  return [line.rstrip() for line in text.strip("\n").splitlines()]


@pytest.mark.orbax
def test_sharded_training_guide_runs_in_order(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  blocks = python_blocks(GUIDE.read_text(encoding="utf-8"))
  assert len(blocks) >= 4
  namespace = {"__name__": "__guide__"}
  for block in blocks:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      code = compile(block.source, f"{GUIDE.name}:{block.line}", "exec")
      exec(code, namespace)
    if block.expected_output is not None:
      assert _lines(out.getvalue()) == _lines(block.expected_output), block.line
  assert (tmp_path / "checkpoints" / "20").is_dir()
  assert namespace["old"]["w1"].is_deleted()  # the step donated its inputs
