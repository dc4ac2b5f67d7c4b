"""The fenced code blocks of a Markdown page, and running its Python ones.

Shared by the tests of the README and of the guides under ``docs/``: a
```` ```python ```` block must run, and when a ```` ```text ```` block follows
it directly (nothing but blank lines between), that block is what it prints.
"""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple


class Fence(NamedTuple):
  """One fenced block: its info string (``python``, ``text``, ...) and body."""

  info: str
  body: str
  line: int  # 1-based line of the opening fence
  end: int  # 1-based line of the closing fence


class PythonBlock(NamedTuple):
  """A ```` ```python ```` block and the output shown right after it, if any."""

  source: str
  line: int
  expected_output: str | None


def fences(text: str) -> list[Fence]:
  """Every fenced block of ``text``, in order (fences do not nest)."""
  found = []
  lines = text.splitlines()
  start = None
  for number, line in enumerate(lines, start=1):
    if start is None:
      if line.startswith("```"):
        start, info, body = number, line[3:].strip(), []
    elif line.strip() == "```":
      found.append(Fence(info, "".join(f"{x}\n" for x in body), start, number))
      start = None
    else:
      body.append(line)
  if start is not None:
    raise ValueError(f"the fence opened on line {start} is never closed")
  return found


def python_blocks(text: str) -> list[PythonBlock]:
  """The ```` ```python ```` blocks, each with the text block after it."""
  lines = text.splitlines()
  all_fences = fences(text)
  blocks = []
  for fence, following in zip(all_fences, [*all_fences[1:], None], strict=True):
    if fence.info != "python":
      continue
    expected = None
    if following is not None and following.info == "text":
      between = lines[fence.end : following.line - 1]
      if all(not x.strip() for x in between):
        expected = following.body
    blocks.append(PythonBlock(fence.body, fence.line, expected))
  return blocks


def _normalised(output: str) -> str:
  return "\n".join(line.rstrip() for line in output.strip("\n").splitlines())


def run_python_block(block: PythonBlock, filename: str) -> None:
  """Runs ``block`` in a fresh namespace; checks its output where one is shown."""
  namespace = {"__name__": "__markdown__"}
  code = compile(block.source, f"{filename}:{block.line}", "exec")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    exec(code, namespace)
  if block.expected_output is not None:
    assert _normalised(stdout.getvalue()) == _normalised(block.expected_output), (
      f"{filename}:{block.line} printed\n{stdout.getvalue()}\nbut the page shows\n"
      f"{block.expected_output}"
    )
