"""notebooks/posthoc.ipynb runs from top to bottom and shows the post-hoc sweep.

A fresh run must reproduce what the stored outputs show on any CPU: the same
sweep of sigma_rel and fit errors, reconstructed losses that agree with the
tracked averages of the same run, and an optimum inside the sweep.
"""

import pathlib
import shutil

import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "posthoc.ipynb"


def _text_outputs(nb):
  out = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream":
        out.append(output["text"])
  return "".join(out)


def _sweep(text):
  """{sigma_rel: (test loss, fit error)} from the printed sweep table."""
  rows = {}
  for line in text.splitlines():
    fields = line.split()
    if len(fields) == 5 and fields[0].startswith("0."):
      rows[float(fields[0])] = (float(fields[3]), float(fields[4]))
  return rows


@pytest.mark.notebook
def test_posthoc_notebook_executes_and_reconstructs(tmp_path):
  copy = tmp_path / NOTEBOOK.name
  shutil.copy(NOTEBOOK, copy)
  nb = nbformat.read(copy, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=60,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError on any failing cell
  text = _text_outputs(nb)
  assert "lowest test loss at sigma_rel=" in text
  assert "reconstructed vs tracked sigma_rel=0.10" in text
  images = [
    o
    for cell in nb.cells
    for o in cell.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(images) == 1
  assert list(tmp_path.iterdir()) == [copy]  # nothing written next to the notebook
  stored = _sweep(_text_outputs(nbformat.read(NOTEBOOK, as_version=4)))
  fresh = _sweep(text)
  assert len(stored) == 17 and sorted(fresh) == sorted(stored)
  # The fit errors depend only on the snapshot steps and the profiles, not
  # on training: they match the stored ones on any CPU. A tracked width fits
  # exactly: its stored fit error is 0, and a fresh one is the rounding of
  # the residual's quadratic form, about sqrt(float64 eps) = 1.5e-8 under
  # any BLAS kernel, hence the absolute term.
  for s, (_, fit) in stored.items():
    assert abs(fresh[s][1] - fit) <= 0.05 * fit + 1e-7, s
  # The losses come from 1000 small-batch SGD steps whose float rounding
  # depends on the CPU's vector units (XLA's CPU code generation), so they
  # are not compared with the stored run; they must agree with this run's
  # tracked average at 0.05, a width the sweep reconstructs (0.10 is checked
  # by the notebook itself, leaf by leaf).
  tracked = _tracked_losses(text)
  assert sorted(tracked) == [0.05, 0.10]
  assert abs(fresh[0.05][0] - tracked[0.05]) <= 2e-3
  best = min(fresh, key=lambda s: fresh[s][0])
  assert min(fresh) < best < max(fresh)  # an optimum inside the sweep


def _tracked_losses(text):
  """{sigma_rel: test loss} of the tracked averages the notebook prints."""
  out = {}
  for line in text.splitlines():
    if line.startswith("tracked sigma_rel="):
      sigma = float(line.split("=")[1].split(":")[0])
      out[sigma] = float(line.rsplit("loss", 1)[1])
  return out


def test_notebook_uses_orbax_snapshots():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  source = "".join(c.source for c in nb.cells if c.cell_type == "code")
  assert "posthoc.SnapshotWriter(" in source and ".npz" not in source


def test_saved_notebook_has_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.get("execution_count") for c in code)
  assert "lowest test loss at sigma_rel=" in _text_outputs(nb)
