"""Sphinx configuration of the optax_ema documentation.

Build it from the repository root with
``sphinx-build docs docs/_build/html`` (``-W`` turns warnings into errors,
as the test suite does). Nothing is downloaded: no intersphinx, MathJax is
served from the build itself, and the notebooks are rendered from their
stored outputs, never executed.
"""

import pathlib
import shutil

import optax_ema

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "optax_ema"
author = "optax_ema authors"
copyright = "optax_ema authors"
release = version = optax_ema.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",  # [source] links to the highlighted code
  "sphinx_copybutton",
  "sphinx.ext.mathjax",
  "sphinx-mathjax-offline",  # MathJax from the build, not from a CDN
  "myst_nb",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# -- The notebooks ---------------------------------------------------------
# They stay in notebooks/ (the test suite executes them there); the site
# renders copies, made here into a git-ignored folder, from their stored
# outputs.


def _copy_notebooks() -> None:
  target = DOCS / "notebooks"
  target.mkdir(exist_ok=True)
  sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
  for source in sources:
    copy = target / source.name
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
      shutil.copyfile(source, copy)  # unchanged copies keep their mtime
  names = {source.name for source in sources}
  for stale in target.glob("*.ipynb"):
    if stale.name not in names:
      stale.unlink()


_copy_notebooks()

# The copy button leaves out doctest and shell prompts and the output lines.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
# \text{average\_decay} in the docstrings' math needs MathJax's textmacros.
mathjax3_config = {
  "loader": {"load": ["[tex]/textmacros"]},
  "tex": {"packages": {"[+]": ["textmacros"]}},
}
myst_heading_anchors = 3

# -- API reference ---------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
# Signatures show names and defaults only (jax.typing.ArrayLike alone is a
# union of nine types, which would bury them); each documented argument's
# type is shown beside its description instead.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
# Aliases by name, not the unions they stand for (jax.typing.ArrayLike would
# otherwise print its nine member types at every argument).
autodoc_type_aliases = {
  "ArrayLike": "jax.typing.ArrayLike",
  "jax.typing.ArrayLike": "jax.typing.ArrayLike",
  "DecayLike": "float | jax.typing.ArrayLike | Callable",
}
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# A NamedTuple's fields are listed from its ``Attributes:`` section, with
# the docstring's words, not a "Type:" box per field from the annotations.
napoleon_attr_annotations = False
# The page outline names members without their class (``step``, not
# ``ReconstructionWeights.step``).
toc_object_entries_show_parents = "hide"

# Every reference must resolve; the only exceptions are names of other
# projects (no intersphinx: nothing may be downloaded at build time).
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(optax|jax|jaxlib|numpy|np|flax|nnx|orbax|chex)(\..*)?"),
  # The standard library's types in the argument types (no intersphinx).
  (r"py:.*", r"(collections\.abc|os|pathlib|typing)\..*"),
  # Private modules are not documented; a type annotation or a docstring may
  # still name one (the reference then renders as plain text).
  (r"py:.*", r"~?optax_ema\._.*"),
]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """Leaves a NamedTuple's fields to its docstring's ``Attributes:``.

  autodoc would also list each field ("Alias for field number 0"), a
  duplicate of the entry napoleon makes from ``Attributes:``.
  """
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  if doc.startswith("Alias for field number"):
    return True
  return skip


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)


# -- HTML ------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"optax_ema {release}"
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
# One search field (the header's), not a second one in the sidebar.
html_sidebars = {
  "**": ["navbar-logo.html", "icon-links.html", "sbt-sidebar-nav.html"]
}
