"""``python -m optax_ema.posthoc``: --list, reconstruction to an Orbax checkpoint.

Expected values: sgd(1) with gradient -1 moves a parameter to t after t
steps; the tracked profile sigma_rel=0.10 at the last snapshot is the power
EMA of 1..t, weights (i**(g+1) - (i-1)**(g+1)) / t**(g+1).
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_ema
from optax_ema import posthoc

pytestmark = pytest.mark.orbax  # every test writes its snapshots first


def _gamma(sigma_rel):
  t = sigma_rel**-2
  return max(r.real for r in np.roots([1, 7, 16 - t, 12 - t]) if abs(r.imag) < 1e-9)


def _snapshots(directory, sigma_rels=(0.05, 0.10), n=30, every=10):
  tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=sigma_rels)
  params = {"layer": {"w": jnp.zeros((2, 3))}, "b": [jnp.zeros(4)]}
  state = tx.init(params)
  with posthoc.SnapshotWriter(directory, every=every, dtype=np.float32) as writer:
    for t in range(1, n + 1):
      grads = {"layer": {"w": -jnp.ones((2, 3))}, "b": [-jnp.ones(4)]}
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      writer(state, t)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "optax_ema.posthoc", *map(str, args)],
    capture_output=True,
    text=True,
    check=False,
    timeout=120,
  )


@pytest.mark.subprocess
def test_command_line_reconstructs_to_an_orbax_checkpoint(tmp_path):
  _snapshots(tmp_path / "snaps")
  out = tmp_path / "ema"
  proc = _cli(tmp_path / "snaps", "--sigma-rel", "0.10", "--out", out)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == "target: sigma_rel=0.1 at step 30"
  assert len([x for x in lines if x.strip().split()[0] in {"10", "20", "30"}]) == 6
  assert lines[-2].startswith("fit error (relative L2 of the profile): ")
  assert lines[-1] == f"wrote 2 arrays to {out}"
  restored = ocp.StandardCheckpointer().restore(out)
  i = np.arange(1, 31, dtype=np.float64)
  g = _gamma(0.10)
  want = ((i ** (g + 1) - (i - 1) ** (g + 1)) / 30.0 ** (g + 1)) @ i
  np.testing.assert_allclose(restored["layer"]["w"], np.full((2, 3), want), rtol=1e-6)
  np.testing.assert_allclose(restored["b"][0], np.full(4, want), rtol=1e-6)
  metadata = ocp.StandardCheckpointer().metadata(out).custom_metadata
  assert metadata["sigma_rel"] == 0.1 and metadata["step"] == 30


@pytest.mark.subprocess
def test_command_line_step_and_snapshots_alias(tmp_path):
  _snapshots(tmp_path / "snaps")
  out = tmp_path / "ema"
  argv = ["--snapshots", tmp_path / "snaps", "--sigma-rel", "0.07", "--step", "20"]
  proc = _cli(*argv, "--out", out)
  assert proc.returncode == 0, proc.stderr
  assert "at step 20" in proc.stdout and " 30 " not in proc.stdout
  want = posthoc.reconstruct(tmp_path / "snaps", 0.07, step=20)
  restored = ocp.StandardCheckpointer().restore(out)
  np.testing.assert_array_equal(restored["layer"]["w"], want["layer"]["w"])


def test_command_line_lists_snapshots_without_reading_arrays(tmp_path, capsys):
  _snapshots(tmp_path)
  assert posthoc.main([str(tmp_path), "--list"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "3 snapshots, 2 stored leaves, 10 values each"
  (run,) = {s.run for s in posthoc.load_snapshots(tmp_path)}
  assert out[1] == f"run: {run}" and len(run) == 32
  assert [line.split() for line in out[3:]] == [
    [str(t), "float32", "0.05,", "0.1"] for t in (10, 20, 30)
  ]


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--sigma-rel", "0.07", "--out", "x"], "give the snapshot directory"),
    (["{d}", "--sigma-rel", "0.07"], "give --list, or --sigma-rel and --out"),
    (["{d}", "--sigma-rel", "0.07", "--step", "15", "--out", "{d}/x"], "steps 10, 20"),
    (["{d}", "--sigma-rel", "0.5", "--out", "{d}/x"], "`--sigma-rel` must be in"),
    (["{d}", "--sigma-rel", "0.07", "--out", "{d}"], "exists already"),
    (["{d}/missing", "--list"], "does not exist"),
    (["{d}", "--snapshots", "{d}/other", "--list"], "the snapshot directory is given"),
    (["{d}", "--snapshots", "{d}", "--list"], "give it once"),
    (["{d}", "--list", "--sigma-rel", "0.07"], "--sigma-rel would be ignored"),
  ],
)
def test_command_line_reports_bad_input(tmp_path, capsys, argv, message):
  _snapshots(tmp_path)
  assert posthoc.main([a.format(d=tmp_path) for a in argv]) == 2
  assert message in capsys.readouterr().err


def test_command_line_reports_a_single_profile(tmp_path, capsys):
  _snapshots(tmp_path, sigma_rels=(0.05,))
  assert posthoc.main([str(tmp_path), "--sigma-rel", "0.07", "--out", "x"]) == 2
  assert "at least two profiles" in capsys.readouterr().err


@pytest.mark.subprocess
def test_command_line_warns_once_for_a_poorly_fit_target(tmp_path):
  _snapshots(tmp_path / "snaps")
  proc = _cli(tmp_path / "snaps", "--sigma-rel", "0.01", "--out", tmp_path / "ema")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("UserWarning") == 1, proc.stderr
  assert "sigma_rel=0.01 at step 30" in proc.stderr
