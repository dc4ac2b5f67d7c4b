"""Prints the test files that need nothing beyond the core dependencies.

The floor run of .ci/run installs only optax_ema's own dependencies (at their
declared floors) and the test runners; a test file qualifies when every
module it imports is the standard library, one of those, or a helper module
of the test suite. Left out on purpose: the golden-file test, which pins
bit patterns of the compiled steps that another XLA version may round
differently in the last place; the benchmark's smoke test, which runs its
Flax and Keras peers; and the post-hoc tests, since ``optax_ema.posthoc``
stores its snapshots with Orbax (the ``orbax`` extra).
"""

import ast
import pathlib
import sys

CORE = {
  "jax",
  "numpy",
  "optax",
  "optax_ema",
  "pytest",
  "chex",
  "hypothesis",
  "ml_dtypes",
}
LOCAL = {"helpers", "grid"}
NOT_ON_FLOORS = {"test_golden.py", "test_benchmark_smoke.py"}


def imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module.split(".")[0])
  return names


def main() -> None:
  tests = pathlib.Path(__file__).resolve().parent.parent / "tests"
  allowed = CORE | LOCAL | set(sys.stdlib_module_names) - {"subprocess"}
  chosen = [
    str(p.relative_to(tests.parent))
    for p in sorted(tests.glob("test_*.py"))
    if p.name not in NOT_ON_FLOORS
    and not p.name.startswith("test_posthoc")
    and imports(p) <= allowed
  ]
  print(" ".join(chosen))


if __name__ == "__main__":
  main()
