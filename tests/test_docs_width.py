"""The documentation's code fits the page: no line scrolls at 1280 px.

The widths are measured on the built site in headless Chromium with a
1280 px wide window: a page's ``<pre>`` blocks hold 76 characters of the
theme's monospace font (the guides, the index and the notebooks' pages),
and 72 inside an API entry, which is indented (a docstring's examples).
Measured as the block's inner width (without its padding) divided by the
width of one character in its font; a line one character longer scrolls.

The formatter is kept from mangling the examples too: a comment after a
statement that does not fit would be moved behind a lone closing bracket
(``tx.init(`` / ``params`` / ``)  # 2. init``), so comments go on a line
of their own.
"""

import importlib
import inspect
import json
import pathlib
import pkgutil
import re

import pytest
from markdown_blocks import fences

import optax_ema

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE_WIDTH = 76  # characters of a code block on a guide page at 1280 px
NOTEBOOK_WIDTH = 75  # a notebook's code cell
API_WIDTH = 72  # inside an API entry (an indented definition list)
PAGES = [DOCS / "index.md", *sorted((DOCS / "guides").glob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# A comment the formatter moved behind a lone closing bracket.
_MANGLED = re.compile(r"\s*[)\]}]+[,:]?\s+#")


def _too_wide(lines, width):
  return [(n, line) for n, line in lines if len(line) > width]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_guide_code_fits_the_page(page):
  text = page.read_text(encoding="utf-8")
  lines = [
    (fence.line + i, line)
    for fence in fences(text)
    for i, line in enumerate(fence.body.splitlines(), start=1)
  ]
  assert lines or page.name == "index.md"
  assert _too_wide(lines, PAGE_WIDTH) == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_fits_the_page(notebook):
  cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
  lines = [
    (n, line)
    for n, cell in enumerate(cells)
    if cell["cell_type"] == "code"
    for line in "".join(cell["source"]).splitlines()
  ]
  assert _too_wide(lines, NOTEBOOK_WIDTH) == []
  assert [(n, line) for n, line in lines if _MANGLED.match(line)] == []


def _modules():
  yield optax_ema
  for info in pkgutil.walk_packages(optax_ema.__path__, "optax_ema."):
    if info.name.endswith("__main__"):
      continue
    yield importlib.import_module(info.name)


def _docstrings():
  """(name, docstring) of every module, class, function and method."""
  seen = set()
  for module in _modules():
    found = [(module.__name__, module)]
    for name, obj in vars(module).items():
      if getattr(obj, "__module__", None) != module.__name__:
        continue
      found.append((f"{module.__name__}.{name}", obj))
      if inspect.isclass(obj):
        for attr, member in vars(obj).items():
          found.append((f"{module.__name__}.{name}.{attr}", member))
    for name, obj in found:
      doc = getattr(obj, "__doc__", None)
      if isinstance(doc, str) and id(doc) not in seen:
        seen.add(id(doc))
        yield name, inspect.cleandoc(doc)


def _example_lines(doc):
  """The lines of the doctests and literal blocks, as the page shows them."""
  out, indent, literal, literal_depth = [], None, False, 0
  for n, line in enumerate(doc.splitlines(), start=1):
    stripped = line.lstrip()
    depth = len(line) - len(stripped)
    if stripped.startswith(">>>"):
      indent = depth
    elif indent is not None and (not stripped or depth < indent):
      indent = None
    if indent is not None:
      out.append((n, line[indent:]))
      continue
    if literal and stripped and depth > literal_depth:
      out.append((n, stripped))
      continue
    if stripped:
      literal = line.rstrip().endswith("::")
      literal_depth = depth
  return out


DOCSTRINGS = sorted(_docstrings())


def test_docstrings_are_collected():
  names = {name for name, _ in DOCSTRINGS}
  assert "optax_ema._moving_average.MovingAverageState" in names
  assert "optax_ema.posthoc._reconstruct.reconstruct" in names
  assert len(DOCSTRINGS) > 100


@pytest.mark.parametrize(("name", "doc"), DOCSTRINGS, ids=[n for n, _ in DOCSTRINGS])
def test_docstring_examples_fit_the_api_page(name, doc):
  del name
  assert _too_wide(_example_lines(doc), API_WIDTH) == []


def test_example_lines_are_those_of_the_doctests_and_literal_blocks():
  doc = inspect.cleandoc(
    """Summary.

    Examples:
      >>> x = 1
      >>> for i in range(2):
      ...   print(i)
      0
      1

    A command::

      python -m tool --flag

    Prose after it.
    """
  )
  assert [line for _, line in _example_lines(doc)] == [
    ">>> x = 1",
    ">>> for i in range(2):",
    "...   print(i)",
    "0",
    "1",
    "python -m tool --flag",
  ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_no_comment_behind_a_lone_closing_bracket(page):
  text = page.read_text(encoding="utf-8")
  mangled = [
    (fence.line + i, line)
    for fence in fences(text)
    if fence.info == "python"
    for i, line in enumerate(fence.body.splitlines(), start=1)
    if _MANGLED.match(line)
  ]
  assert mangled == []
