"""No function is longer than 60 lines of code.

A function's length is counted over its whole source, nested functions
included: the lines that are not blank, not comment-only and not part of a
docstring (its own or a nested function's or class's). Long functions hide
several concerns; past this size, split them.
"""

import ast
import io
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_CODE_LINES = 60


def _docstring_lines(tree: ast.AST) -> set[int]:
  """The line numbers of every docstring in a module."""
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  out: set[int] = set()
  for node in ast.walk(tree):
    if not isinstance(node, kinds) or not node.body:
      continue
    first = node.body[0]
    if (
      isinstance(first, ast.Expr)
      and isinstance(first.value, ast.Constant)
      and isinstance(first.value.value, str)
    ):
      out.update(range(first.lineno, first.end_lineno + 1))
  return out


def _code_lines(source: str) -> set[int]:
  """The line numbers that hold a token other than a comment or a newline."""
  skip = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
  }
  out: set[int] = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type not in skip:
      out.update(range(token.start[0], token.end[0] + 1))
  return out


def function_lengths(path: pathlib.Path) -> list[tuple[int, str, int]]:
  """``(line, name, code lines)`` of every function in a file, nested ones too."""
  source = path.read_text(encoding="utf-8")
  tree = ast.parse(source)
  code = _code_lines(source) - _docstring_lines(tree)
  return sorted(
    (
      node.lineno,
      node.name,
      len(code.intersection(range(node.lineno, node.end_lineno + 1))),
    )
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
  )


def long_functions(folder: str, exclude: tuple[str, ...] = ()) -> list[str]:
  """``"<path>:<line> <name> (<n> code lines)"`` for each function over the limit."""
  out = []
  for path in sorted((ROOT / folder).rglob("*.py")):
    where = path.relative_to(ROOT).as_posix()
    if where in exclude:
      continue
    for line, name, n in function_lengths(path):
      if n > MAX_CODE_LINES:
        out.append(f"{where}:{line} {name} ({n} code lines)")
  return out


def test_counts_lines_of_code_not_docstrings_comments_or_blanks(tmp_path):
  path = tmp_path / "example.py"
  path.write_text(
    "def outer(\n"
    "  a,\n"
    "):\n"
    '  """A docstring\n\n  over three lines."""\n'
    "  # a comment\n"
    "\n"
    "  def inner():\n"
    '    """Inner\'s docstring."""\n'
    "    return (  # a comment after code\n"
    "      a\n"
    "    )\n"
    "\n"
    "  return inner\n",
    encoding="utf-8",
  )
  assert function_lengths(path) == [(1, "outer", 8), (9, "inner", 4)]


def test_no_long_function_in_the_benchmarks():
  assert long_functions("benchmarks") == []


def test_no_long_function_in_the_library():
  assert long_functions("optax_ema", exclude=("optax_ema/demo.py",)) == []
