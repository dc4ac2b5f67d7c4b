"""Every Python block of the documentation's pages runs, and prints what it shows.

The pages are ``docs/index.md`` and the guides ``docs/guides/*.md``. A block
followed directly by a ```` ```text ```` block must print exactly that text.
"""

import pathlib

import pytest
from markdown_blocks import python_blocks
from markdown_blocks import run_python_block

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages whose blocks are one walk-through, each block using the names of the
# ones before it, with shell commands between them: a test of their own runs
# them in order, in one namespace.
IN_ORDER = {
  "guides/posthoc.md": "tests/test_posthoc_guide.py",
  "guides/sharded_training.md": "tests/test_sharded_training_guide.py",
}
PAGES = [
  page
  for page in [DOCS / "index.md", *sorted((DOCS / "guides").glob("*.md"))]
  if page.relative_to(DOCS).as_posix() not in IN_ORDER
]

# The blocks that cannot run here, each named by its page and a line found in
# that block only, with the reason. They are still compiled (valid Python).
OPT_OUT = {
  ("guides/migrating.md", "import tensorflow_addons as tfa"): (
    "the TensorFlow Addons script being migrated from: TensorFlow Addons is "
    "end-of-life and not installable next to this project's dependencies"
  ),
}


def _collect():
  runnable, opted_out = [], []
  matched = set()
  for page in PAGES:
    name = page.relative_to(DOCS).as_posix()
    for index, block in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
      case = (name, index, block)
      keys = [key for key in OPT_OUT if key[0] == name and key[1] in block.source]
      if len(keys) > 1:
        raise ValueError(f"{name}:{block.line} matches several opt-outs: {keys}")
      (opted_out if keys else runnable).append(case)
      matched.update(keys)
  if stale := set(OPT_OUT) - matched:
    raise ValueError(f"opt-outs that match no block (remove them): {sorted(stale)}")
  return runnable, opted_out


RUNNABLE, OPTED_OUT = _collect()


def _ids(cases):
  return [f"{name}:{block.line}" for name, _, block in cases]


def test_pages_run_in_order_have_their_own_test():
  for page, test in IN_ORDER.items():
    assert (DOCS / page).exists(), page
    assert page in (ROOT / test).read_text(), (page, test)


def test_every_guide_has_python_examples():
  pages_with_code = {name for name, _, _ in RUNNABLE}
  for page in PAGES:
    assert page.relative_to(DOCS).as_posix() in pages_with_code, page
  assert len(RUNNABLE) >= 20


def _marked(cases):
  """The cases, a block that writes Orbax checkpoints marked ``orbax``."""
  out = []
  for name, index, block in cases:
    marks = [pytest.mark.orbax] if "import orbax" in block.source else []
    out.append(pytest.param(name, index, block, marks=marks))
  return out


@pytest.mark.parametrize(
  ("name", "index", "block"), _marked(RUNNABLE), ids=_ids(RUNNABLE)
)
def test_guide_python_block_runs(name, index, block, tmp_path, monkeypatch):
  del index
  monkeypatch.chdir(tmp_path)  # blocks that write files write them here
  run_python_block(block, f"docs/{name}")


@pytest.mark.parametrize(("name", "index", "block"), OPTED_OUT, ids=_ids(OPTED_OUT))
def test_opted_out_block_is_valid_python(name, index, block):
  del index
  code = compile(block.source, f"docs/{name}:{block.line}", "exec")
  assert code.co_names  # it is code, not an empty block


ALL_PAGES = [
  DOCS / "index.md",
  *sorted((DOCS / "guides").glob("*.md")),
  ROOT / "README.md",
]


def _headings(text):
  """The page's markdown headings, outside fenced code blocks."""
  found, fenced = [], False
  for line in text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and line.startswith("#"):
      found.append(line.strip())
  return found


@pytest.mark.parametrize(
  "page", ALL_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_no_page_repeats_a_heading_or_a_paragraph(page):
  text = page.read_text()
  headings = _headings(text)
  assert len(headings) == len(set(headings)), sorted(
    {h for h in headings if headings.count(h) > 1}
  )
  paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
  repeated = {p[:80] for p in paragraphs if paragraphs.count(p) > 1}
  assert not repeated, repeated
