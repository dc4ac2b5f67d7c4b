"""benchmarks/bench_posthoc.py in its small configuration: runs and checks itself.

Speed is not asserted (that is the benchmark's job, on its full
configuration); the memory bounds it states are, as the script asserts them,
and its accuracy rows must agree with its own NumPy restatement of EDM2.
"""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_posthoc.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_posthoc", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("bench_posthoc", module)
  spec.loader.exec_module(module)
  return module


bench = _load_bench()


def test_restatement_gives_edm2_exponents_and_normalised_coefficients():
  # EDM2's widths 0.05 and 0.10 are the exponents 16.97 and 6.94.
  assert abs(bench.edm2_gamma(0.05) - 16.9722) < 1e-4
  assert abs(bench.edm2_gamma(0.10) - 6.9372) < 1e-4
  c = bench.edm2_coefficients([100, 100, 200, 200], [0.05, 0.1, 0.05, 0.1], 200, 0.07)
  np.testing.assert_allclose(c.sum(), 1.0, rtol=1e-12)


def test_the_model_has_the_documented_size():
  shapes = bench.model_shapes(*bench.CONFIGS["full"][:3])
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert abs(n - 64_000_000) < 0.01 * 64_000_000 and len(shapes) == 195


@pytest.mark.orbax
@pytest.mark.subprocess
def test_quick_run_writes_its_results_and_holds_its_bounds(tmp_path):
  out = tmp_path / "bench_posthoc.json"
  bench.main(["--quick", "--out", str(out)])  # raises if a bound fails
  report = json.loads(out.read_text())
  assert report["loadavg_start"] and report["memory"]["checks"]
  assert all(check["ok"] for check in report["memory"]["checks"])
  modes = {(r["mode"], r["allocator"]) for r in report["memory"]["rows"]}
  assert len(modes) == 5
  for row in report["accuracy"]:
    assert row["max_coefficient_difference"] < 1e-10
    np.testing.assert_allclose(row["ours_fp16"], row["edm2_fp16"], rtol=1e-2)
  streaming = [r for r in report["memory"]["rows"] if "max_abs_error_vs_float64" in r]
  assert streaming and all(r["max_error_relative_to_max_abs"] < 1e-6 for r in streaming)
  markdown = out.with_suffix(".md").read_text()
  assert markdown.count("| bound |") == 1 and "timings are noisy" in markdown
  assert out.with_suffix(".txt").is_file()
