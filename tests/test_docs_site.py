"""The documentation site builds with warnings as errors, and is complete.

One ``sphinx-build -W`` of ``docs/`` into a temporary folder, then checks on
the HTML: every public name has its API entry, every guide and notebook is a
page, the notebooks show their stored outputs, the pages load nothing from
the network, and every page the README links to exists.
"""

import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import optax_ema

pytestmark = pytest.mark.sphinx  # the tests read the site one build makes

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _public_names():
  """``optax_ema.NAME`` for every public name, submodules' names included."""
  names = []
  for name in optax_ema.__all__:
    obj = getattr(optax_ema, name)
    names.append(f"optax_ema.{name}")
    if inspect.ismodule(obj):
      names += [f"optax_ema.{name}.{sub}" for sub in obj.__all__]
  return names


PUBLIC = _public_names()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  out = tmp_path_factory.mktemp("site")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-q",
      "-b",
      "html",
      "-d",
      str(out / "doctrees"),
      str(DOCS),
      str(out / "html"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    check=False,
  )
  return result, out / "html"


@pytest.fixture(scope="module")
def html(build):
  result, folder = build
  assert result.returncode == 0, result.stdout + result.stderr
  return folder


@pytest.fixture(scope="module")
def api_ids(html):
  ids = set()
  for page in (html / "api").glob("*.html"):
    ids.update(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
  return ids


def _ids_of(page: pathlib.Path) -> set[str]:
  return set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))


def test_site_builds_with_warnings_as_errors(build):
  result, folder = build
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stderr == ""  # -q: any warning would be printed here
  assert (folder / "index.html").is_file()


def test_public_names_cover_both_submodules():
  assert "optax_ema.moving_average" in PUBLIC
  assert "optax_ema.schedules.warmup" in PUBLIC
  assert "optax_ema.posthoc.reconstruct" in PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_an_api_entry(name, api_ids):
  obj = optax_ema
  for part in name.split(".")[1:]:
    obj = getattr(obj, part)
  anchor = f"module-{name}" if inspect.ismodule(obj) else name
  assert anchor in api_ids, f'no id="{anchor}" in the API reference'


def test_package_module_has_an_api_entry(api_ids):
  assert "module-optax_ema" in api_ids


@pytest.mark.parametrize(
  "guide", sorted(p.stem for p in (DOCS / "guides").glob("*.md"))
)
def test_every_guide_is_a_page_of_the_site(guide, html):
  assert (html / "guides" / f"{guide}.html").is_file()


@pytest.mark.parametrize(
  "notebook", sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
)
def test_notebook_is_rendered_with_its_stored_outputs(notebook, html):
  source = ROOT / "notebooks" / f"{notebook}.ipynb"
  cells = json.loads(source.read_text(encoding="utf-8"))["cells"]
  outputs = [out for cell in cells for out in cell.get("outputs", [])]
  images = sum("image/png" in out.get("data", {}) for out in outputs)
  streams = [out for out in outputs if out["output_type"] == "stream"]
  assert images >= 1 and streams, "the notebook has no stored outputs to show"
  page = (html / "notebooks" / f"{notebook}.html").read_text(encoding="utf-8")
  assert page.count('<img alt="../_images/') == images
  last_line = "".join(streams[-1]["text"]).strip().splitlines()[-1]
  assert _escaped(last_line) in page


def _escaped(text: str) -> str:
  return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_pages_load_nothing_from_the_network(html):
  loaded = re.compile(r'<(?:script|img|link)\b[^>]*?\b(?:src|href)="([^"]*)"')
  for page in html.rglob("*.html"):
    for url in loaded.findall(page.read_text(encoding="utf-8")):
      assert not re.match(r"(https?:)?//", url), f"{page.name} loads {url}"


def _readme_links():
  targets = re.findall(r"\]\(([^)\s]+)\)", README)
  targets += re.findall(r'<img [^>]*src="([^"]+)"', README)
  return sorted({t for t in targets if not re.match(r"[a-z]+:", t)})


README_LINKS = _readme_links()


def test_readme_links_to_every_guide():
  linked = {link.split("#")[0] for link in README_LINKS}
  for guide in sorted((DOCS / "guides").glob("*.md")):
    assert guide.relative_to(ROOT).as_posix() in linked, guide.name


@pytest.mark.parametrize("link", README_LINKS)
def test_page_linked_from_the_readme_exists(link, html):
  path, _, fragment = link.partition("#")
  if not path:  # a heading of the README itself
    slugs = {_github_slug(h) for h in re.findall(r"^#+ (.*)$", README, flags=re.M)}
    assert fragment in slugs, link
    return
  assert (ROOT / path).exists(), link
  if not path.startswith(("docs/", "notebooks/")) or path.endswith(".png"):
    return
  built = pathlib.Path(path.removeprefix("docs/")).with_suffix(".html")
  page = html / built
  assert page.is_file(), f"{link}: not a page of the site ({built})"
  if fragment:
    assert fragment in _ids_of(page), f"{link}: no such heading in {built}"


def _github_slug(heading: str) -> str:
  slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return slug.replace(" ", "-")


def test_api_pages_link_to_their_source(html):
  page = (html / "api" / "averaging.html").read_text(encoding="utf-8")
  assert "viewcode-link" in page  # the [source] links of sphinx.ext.viewcode
  assert (html / "_modules" / "optax_ema" / "_moving_average.html").is_file()


def test_api_pages_show_argument_types(html):
  page = (html / "api" / "averaging.html").read_text(encoding="utf-8")
  text = re.sub(r"<[^>]+>", "", page)
  assert "average_decay (float | jax.typing.ArrayLike | Callable)" in text
  assert "sequential_update (bool)" in text


def test_code_blocks_have_a_copy_button_that_skips_prompts(html):
  page = (html / "index.html").read_text(encoding="utf-8")
  assert "_static/copybutton.js" in page
  script = (html / "_static" / "copybutton.js").read_text(encoding="utf-8")
  # The prompts it strips: doctest's and the shell's.
  assert "formatCopyText(text, '>>> |\\\\.\\\\.\\\\. |\\\\$ ', true" in script
