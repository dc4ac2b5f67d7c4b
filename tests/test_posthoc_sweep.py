"""posthoc.sweep and posthoc.plot_sweep: one reconstruction and one call per width.

The expected rows come from posthoc.reconstruct and reconstruction_weights
called width by width, and, at the tracked widths, from the power EMA of the
trajectory written here in NumPy (update i of t weighs
(i**(g+1) - (i-1)**(g+1)) / t**(g+1)).
"""

import sys
import warnings

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest
from matplotlib.figure import Figure

import optax_ema
from optax_ema import posthoc
from optax_ema.posthoc import _reconstruct
from optax_ema.posthoc import _solver

STEPS, EVERY = 400, 50
WIDTHS = [0.04, 0.05, 0.07, 0.10, 0.15]


def _gamma(sigma_rel):  # the largest real root of EDM2's cubic
  t = sigma_rel**-2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return max(r.real for r in roots if abs(r.imag) < 1e-9)


def _power_average(xs, gamma):
  t = len(xs)
  i = np.arange(1, t + 1, dtype=np.float64)
  w = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)
  return w @ np.asarray(xs, np.float64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """power_ema(sgd(1)) moved along a random walk; float32 snapshots."""
  directory = tmp_path_factory.mktemp("sweep")
  rng = np.random.default_rng(0)
  traj = 1.0 + np.cumsum(0.01 * rng.normal(size=(STEPS + 1, 16)), axis=0)
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
  params = {"w": jnp.asarray(traj[0], jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  with posthoc.SnapshotWriter(directory, every=EVERY, dtype=np.float32) as writer:
    for t in range(1, STEPS + 1):
      grads = {"w": params["w"] - jnp.asarray(traj[t], jnp.float32)}
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      writer(state, t)
  return directory, traj, params


class _Recorder:
  def __init__(self):
    self.calls = []

  def __call__(self, params):
    self.calls.append(jax.tree.map(np.asarray, params))
    return {"mean": jnp.mean(params["w"]), "first": params["w"][0]}


@pytest.mark.orbax
def test_rows_are_the_reconstructions_width_by_width(run):
  directory, _, params = run
  evaluate = _Recorder()
  rows = posthoc.sweep(directory, WIDTHS, evaluate, like=params)
  assert [r.sigma_rel for r in rows] == WIDTHS
  assert len(evaluate.calls) == len(WIDTHS)  # once per width, in order
  for row, seen in zip(rows, evaluate.calls, strict=True):
    want = posthoc.reconstruct(directory, row.sigma_rel, like=params)
    np.testing.assert_array_equal(seen["w"], np.asarray(want["w"]))
    fit = posthoc.reconstruction_weights(directory, row.sigma_rel)
    assert row.step == STEPS and row.fit_error == fit.fit_error
    assert sorted(row.value) == ["first", "mean"]
    assert row.value["first"] == float(seen["w"][0])
    assert row.value["mean"] == pytest.approx(np.mean(seen["w"]), rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
@pytest.mark.orbax
def test_a_tracked_width_is_the_numpy_power_average(run, sigma_rel):
  directory, traj, _ = run
  (row,) = posthoc.sweep(directory, [sigma_rel], lambda p: p["w"][3])
  want = _power_average(traj[1:], _gamma(sigma_rel))[3]
  np.testing.assert_allclose(row.value, want, rtol=1e-5)
  assert row.fit_error < 1e-6


@pytest.mark.orbax
def test_an_earlier_step_uses_the_snapshots_up_to_it(run):
  directory, traj, _ = run
  (row,) = posthoc.sweep(directory, [0.10], lambda p: p["w"][0], step=200)
  assert row.step == 200
  want = _power_average(traj[1:201], _gamma(0.10))[0]
  np.testing.assert_allclose(row.value, want, rtol=1e-5)


@pytest.mark.orbax
def test_tuples_and_scalars_come_back_as_floats(run):
  directory, _, params = run
  (row,) = posthoc.sweep(directory, [0.07], lambda p: (p["w"][0], 2), like=params)
  assert isinstance(row.value, tuple) and all(type(v) is float for v in row.value)
  assert row.value[1] == 2.0
  (row,) = posthoc.sweep(directory, [0.07], lambda p: jnp.sum(p["w"]))
  assert type(row.value) is float


@pytest.mark.orbax
def test_poor_fits_warn_once_listing_the_widths(run):
  directory, _, _ = run
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rows = posthoc.sweep(directory, [0.01, 0.012, 0.07, 0.29], lambda p: 0.0)
  poor = [r.sigma_rel for r in rows if r.fit_error > 0.1]
  assert poor == [0.01, 0.012, 0.29]  # fit errors from reconstruction_weights
  assert len(caught) == 1 and caught[0].category is UserWarning
  message = str(caught[0].message)
  assert "3 of 4 widths" in message
  assert "0.01 (" in message and "0.012 (" in message and "0.29 (" in message
  assert "0.07" not in message


@pytest.mark.orbax
def test_per_width_fit_warnings_are_folded_into_one(run, monkeypatch):
  directory, _, _ = run
  original = _reconstruct.reconstruct

  def noisy(*args, **kwargs):
    warnings.warn("fit_error 0.5 exceeds 0.1", UserWarning, stacklevel=2)
    warnings.warn("something else", RuntimeWarning, stacklevel=2)
    return original(*args, **kwargs)

  solve = _solver.select_weights

  def noisy_solver(*args, **kwargs):
    warnings.warn("the fit error is 0.5", UserWarning, stacklevel=2)
    return solve(*args, **kwargs)

  monkeypatch.setattr(_reconstruct, "reconstruct", noisy)
  monkeypatch.setattr(_solver, "select_weights", noisy_solver)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    posthoc.sweep(directory, [0.01, 0.02, 0.07], lambda p: 0.0)
  fit = [w for w in caught if "fit" in str(w.message)]
  other = [w for w in caught if w.category is RuntimeWarning]
  assert len(fit) == 1 and "of 3 widths" in str(fit[0].message)
  assert len(other) == 3  # other warnings are not swallowed


@pytest.mark.orbax
def test_no_warning_when_every_width_fits(run):
  directory, _, _ = run
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    rows = posthoc.sweep(directory, [0.05, 0.07, 0.10], lambda p: 0.0)
  assert max(r.fit_error for r in rows) < 0.1


@pytest.mark.orbax
def test_like_is_checked(run):
  directory, _, _ = run
  with pytest.raises(ValueError, match="shapes of the snapshots"):
    posthoc.sweep(directory, [0.07], lambda p: 0.0, like={"w": jnp.zeros(3)})


@pytest.mark.parametrize(
  ("sigma_rels", "error", "match"),
  [
    ([], ValueError, "`sigma_rels` is empty"),
    (0.07, TypeError, "`sigma_rels` must be a sequence"),
    ([0.07, 0.5], ValueError, "`sigma_rel` must be in"),
  ],
)
@pytest.mark.orbax
def test_bad_widths_raise_before_any_evaluation(run, sigma_rels, error, match):
  directory, _, _ = run
  evaluate = _Recorder()
  with pytest.raises(error, match=match):
    posthoc.sweep(directory, sigma_rels, evaluate)
  assert evaluate.calls == []


@pytest.mark.orbax
def test_evaluate_must_return_numbers(run):
  directory, _, _ = run
  with pytest.raises(TypeError, match="`evaluate` must return a number"):
    posthoc.sweep(directory, [0.07], lambda p: p["w"])


# --- plot_sweep ----------------------------------------------------------------


@pytest.mark.orbax
def test_plot_marks_the_tracked_widths_and_poor_fits(run, monkeypatch):
  directory, _, _ = run
  import matplotlib.pyplot as plt

  def show(*args, **kwargs):
    raise AssertionError("plot_sweep must not call plt.show()")

  monkeypatch.setattr(plt, "show", show)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rows = posthoc.sweep(directory, [0.15, 0.01, 0.07], lambda p: (1.0, p["w"][0]))
  fig = posthoc.plot_sweep(rows, tracked=directory, key=1)
  assert isinstance(fig, Figure)
  (ax,) = fig.axes
  assert ax.get_xscale() == "log"
  curve, good, hollow, *tracked = ax.lines
  np.testing.assert_array_equal(curve.get_xdata(), [0.01, 0.07, 0.15])  # sorted
  np.testing.assert_array_equal(
    curve.get_ydata(), [rows[1].value[1], rows[2].value[1], rows[0].value[1]]
  )
  np.testing.assert_array_equal(hollow.get_xdata(), [0.01])
  assert hollow.get_markerfacecolor() == "none"
  np.testing.assert_array_equal(good.get_xdata(), [0.07, 0.15])
  assert [line.get_xdata()[0] for line in tracked] == [0.05, 0.10]


def test_plot_draws_on_a_given_axes_and_needs_a_key_for_several_values():
  rows = [posthoc.SweepRow(s, 10, 0.0, {"a": s, "b": 1.0}) for s in (0.05, 0.1)]
  with pytest.raises(ValueError, match="pass `key=`"):
    posthoc.plot_sweep(rows)
  fig = Figure()
  ax = fig.add_subplot()
  assert posthoc.plot_sweep(rows, key="b", ax=ax, tracked=[0.05]) is fig
  assert ax.get_ylabel() == "b"


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
  rows = [posthoc.SweepRow(0.05, 10, 0.0, 1.0)]
  with pytest.raises(ImportError, match="pip install matplotlib"):
    posthoc.plot_sweep(rows)


def test_matplotlib_backend_is_not_changed():
  before = matplotlib.get_backend()
  posthoc.plot_sweep([posthoc.SweepRow(0.05, 10, 0.0, 1.0)])
  assert matplotlib.get_backend() == before
