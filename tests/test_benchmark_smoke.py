"""Smoke test of benchmarks/bench_ema.py: every row's correctness check.

Runs each benchmark row for a few steps on a tiny (64K-parameter) tree and
compares its average(s) with a NumPy EMA of its own parameter trajectory. No
timing is asserted (speed is the benchmark's job). Needs flax and keras (the
benchmark compares against both).
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ema.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_ema", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("bench_ema", module)  # dataclasses look it up
  spec.loader.exec_module(module)
  return module


bench = _load_bench()
ROWS = bench.all_rows()


def test_reference_ema_reproduces_tfa_published_numbers():
  # TFA's MovingAverage test: sgd(2.0), decay 0.5, grads 0.1 then 0.1 on
  # var0 = [1, 2]: params [0.8, 1.8] then [0.6, 1.6], average [0.75, 1.75].
  trajectory = [[np.array([1.0, 2.0])], [np.array([0.8, 1.8])], [np.array([0.6, 1.6])]]
  (average,) = bench.reference_averages(trajectory, 0.5, "copy")
  np.testing.assert_allclose(average, [0.75, 1.75])


def test_reference_ema_keras_convention_copies_on_first_step():
  trajectory = [[np.array([9.0])], [np.array([1.0])], [np.array([3.0])]]
  (average,) = bench.reference_averages(trajectory, 0.5, "keras")
  np.testing.assert_allclose(average, [0.5 * 1.0 + 0.5 * 3.0])


def test_reference_ema_update_every_uses_compensated_decay():
  trajectory = [[np.array([0.0])]] + [[np.array([float(t)])] for t in range(1, 5)]
  (average,) = bench.reference_averages(trajectory, 0.5, "copy", update_every=2)
  first = (1 - 0.25) * 2.0
  np.testing.assert_allclose(average, [0.25 * first + 0.75 * 4.0])


def test_tree_sizes_are_the_documented_ones():
  assert 45 <= bench.num_leaves("1M") <= 55
  assert abs(bench.num_params("1M") - 1_000_000) < 0.01 * 1_000_000
  assert 190 <= bench.num_leaves("64M") <= 210
  assert abs(bench.num_params("64M") - 64_000_000) < 0.01 * 64_000_000


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row_matches_numpy_ema(row):
  result = bench.check_row(row, "64K")
  assert result["row"] == row.name


def test_check_row_rejects_an_average_that_does_not_move():
  good = next(r for r in ROWS if r.name == "hand EMA fused in step")

  def make_stuck(size):
    runner = good.make(size)
    init = runner.init
    runner.averages = lambda state: [bench._host_leaves(init()[0])]
    return runner

  stuck = bench.Row("stuck", "optax", "optax adam", make_stuck)
  with pytest.raises(AssertionError):
    bench.check_row(stuck, "64K")


def test_fusion_count_sees_one_loop_for_the_floor():
  floor = jax.jit(lambda e, p: e + 0.01 * (p - e), donate_argnums=(0,))
  x = jnp.zeros((1024,))
  compiled = floor.lower(x, x).compile()
  assert bench._memory_stats(compiled)["fusions"] == 1
