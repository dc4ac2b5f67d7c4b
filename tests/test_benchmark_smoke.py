"""Smoke test of benchmarks/bench_ema.py: every row averages as its name says.

Runs each benchmark row for a few steps on a tiny (64K-parameter) tree and
compares its average(s) with the NumPy EMA of ``helpers`` over the row's own
parameter trajectory, with the decays, start and update period its name
promises. No timing is asserted (speed is the benchmark's job). Needs flax
and keras (the benchmark compares against both).
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
  sys.path.insert(0, str(BENCHMARKS))

import bench_ema  # noqa: E402
from ema import check  # noqa: E402
from ema import runner  # noqa: E402
from ema import xla  # noqa: E402

SIZE = "64K"
STEPS = 3  # averaging steps
DECAY = 0.99
RTOL, ATOL = 2e-5, 2e-6  # float32 rounding over a few steps
ROWS = bench_ema.all_rows()
AVERAGING = [r for r in ROWS if r.kind == "step" and r.baseline is not None]
ALONE = [r for r in ROWS if r.kind == "step" and r.baseline is None]


def _by_name(name):
  return next(r for r in ROWS if r.name == name)


def _trajectory(run, steps):
  """(the last state, the params before step 1 and after every step)."""
  state = run.init()
  trajectory = [run.params(state)]
  for _ in range(steps):
    state = run.step(state)
    trajectory.append(run.params(state))
  return state, trajectory


def _largest_change(after, before):
  return max(np.max(np.abs(a - b)) for a, b in zip(after, before, strict=True))


def test_reference_ema_reproduces_tfa_published_numbers():
  # TFA's MovingAverage test: sgd(2.0), decay 0.5, grads 0.1 then 0.1 on
  # var0 = [1, 2]: params [0.8, 1.8] then [0.6, 1.6], average [0.75, 1.75].
  trajectory = [[np.array([1.0, 2.0])], [np.array([0.8, 1.8])], [np.array([0.6, 1.6])]]
  ((average,),) = helpers.np_run_emas(trajectory, [0.5])
  np.testing.assert_allclose(average, [0.75, 1.75])


def test_reference_ema_keras_convention_copies_on_first_step():
  trajectory = [[np.array([9.0])], [np.array([1.0])], [np.array([3.0])]]
  ((average,),) = helpers.np_run_emas(trajectory, [0.5], convention="keras")
  np.testing.assert_allclose(average, [0.5 * 1.0 + 0.5 * 3.0])


def test_reference_ema_update_every_uses_compensated_decay():
  trajectory = [[np.array([0.0])]] + [[np.array([float(t)])] for t in range(1, 5)]
  ((average,),) = helpers.np_run_emas(trajectory, [0.5], update_every=2)
  first = (1 - 0.25) * 2.0
  np.testing.assert_allclose(average, [0.25 * first + 0.75 * 4.0])


def test_tree_sizes_are_the_documented_ones():
  assert 45 <= bench_ema.num_leaves("1M") <= 55
  assert abs(bench_ema.num_params("1M") - 1_000_000) < 0.01 * 1_000_000
  assert 190 <= bench_ema.num_leaves("64M") <= 210
  assert abs(bench_ema.num_params("64M") - 64_000_000) < 0.01 * 64_000_000


@pytest.mark.parametrize("row", AVERAGING, ids=[r.name for r in AVERAGING])
def test_each_average_is_the_numpy_ema_of_the_rows_own_trajectory(row):
  decays = (0.99, 0.999) if "decays=" in row.name else (DECAY,)
  update_every = 10 if "update_every=10" in row.name else 1
  convention = "keras" if row.group == "keras" else "copy"  # Keras copies first
  state, trajectory = _trajectory(run := row.make(SIZE), STEPS * update_every)
  want = helpers.np_run_emas(
    trajectory, decays, convention=convention, update_every=update_every
  )
  got = run.averages(state)
  assert len(got) == len(decays)
  for average, expected in zip(got, want, strict=True):
    helpers.assert_tree_close(average, expected, rtol=RTOL, atol=ATOL)
    # So that an average stuck at the start could not pass:
    assert _largest_change(expected, trajectory[0]) > 20 * ATOL


@pytest.mark.parametrize("row", ALONE, ids=[r.name for r in ALONE])
def test_an_optimizer_alone_trains_and_holds_no_average(row):
  state, (first, *_, last) = _trajectory(run := row.make(SIZE), STEPS)
  assert run.averages(state) == []
  assert _largest_change(last, first) > 1e-4


def test_the_floor_is_a_flat_numpy_ema_towards_fixed_params():
  run = _by_name("floor: flat e + (1-d)(p-e)").make(SIZE)
  state = run.init()
  start, target = (np.asarray(x) for x in state[:2])
  for _ in range(STEPS):
    state = run.step(state)
  want = helpers.np_ema(start, [target] * STEPS, [DECAY] * STEPS)
  np.testing.assert_allclose(np.asarray(state[0]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  ("name", "kernel"),
  [
    ("STREAM scale b = s*a", lambda a, b, c: 3.0 * b),
    ("STREAM triad a = b + s*c", lambda a, b, c: b + 3.0 * c),
  ],
)
def test_stream_kernels_compute_what_they_are_named_for(name, kernel):
  run = _by_name(name).make(SIZE)
  before = [np.asarray(x, np.float64) for x in run.init()]
  after = run.step(run.init())
  want = kernel(*before)
  np.testing.assert_allclose(np.asarray(after[0]), want, rtol=1e-6, atol=1e-7)


def test_check_row_rejects_an_average_that_does_not_move():
  good = _by_name("hand EMA fused in step")

  def make_stuck(size):
    stuck = good.make(size)
    init = stuck.init
    stuck.averages = lambda state: [runner.host_leaves(init()[0])]
    return stuck

  stuck = bench_ema.Row("stuck", "optax", "optax adam", make_stuck)
  with pytest.raises(AssertionError):
    bench_ema.check_row(stuck, SIZE)


def test_check_row_uses_the_test_suites_numpy_ema():
  assert check.references() is helpers


def test_fusion_count_sees_one_loop_for_the_floor():
  floor = jax.jit(lambda e, p: e + 0.01 * (p - e), donate_argnums=(0,))
  x = jnp.zeros((1024,))
  compiled = floor.lower(x, x).compile()
  assert xla.memory_stats(compiled)["fusions"] == 1


def _keys(report):
  """The report's layout: its keys, those of a size, a row and its XLA figures."""
  size = next(iter(report["sizes"].values()))
  row = size["rows"]["moving_average(adam)"]
  return {
    "report": sorted(report),
    "config": sorted(report["config"]),
    "size": sorted(size),
    "row": sorted(row),
    "xla": sorted(row["memory"]["xla"][0]),
  }


def test_a_quick_run_writes_the_committed_formats(tmp_path):
  out = tmp_path / "bench_ema.json"
  rows = "optax adam,moving_average(adam)"
  bench_ema.main(["--quick", "--no-memory", "--rows", rows, "--out", str(out)])
  committed = BENCHMARKS / "results" / "bench_ema.json"
  got = json.loads(out.read_text())
  assert _keys(got) == _keys(json.loads(committed.read_text()))
  assert list(got["sizes"]) == ["64K"]
  markdown = out.with_suffix(".md").read_text().splitlines()
  table_head = next(line for line in markdown if line.startswith("| row |"))
  assert table_head in committed.with_suffix(".md").read_text().splitlines()
  assert out.with_suffix(".txt").read_text().startswith("optax_ema benchmark, ")
