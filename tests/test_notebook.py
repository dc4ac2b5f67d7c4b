"""notebooks/quickstart.ipynb runs top to bottom and is committed with outputs."""

import pathlib
import re

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.notebook  # the tests read one execution

NOTEBOOK = (
  pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
)


def _outputs(cell):
  """(kind, text) of each output: stream names, or 'image' / other mime types."""
  kinds = []
  for out in cell.get("outputs", []):
    if out["output_type"] == "stream":
      if kinds and kinds[-1][0] == out["name"]:
        # A stream may arrive in several chunks (timing): one output.
        kinds[-1] = (out["name"], kinds[-1][1] + out["text"])
      else:
        kinds.append((out["name"], out["text"]))
    elif out["output_type"] == "error":
      kinds.append(("error", out["ename"]))
    elif "image/png" in out.get("data", {}):
      kinds.append(("image", ""))
    else:
      kinds.append((out["output_type"], ""))
  return kinds


def _text(nb):
  return "".join(
    text for cell in nb.cells for kind, text in _outputs(cell) if kind == "stdout"
  )


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cwd = tmp_path_factory.mktemp("notebook")
  client = nbclient.NotebookClient(
    nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": cwd}}
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  return nb


def test_notebook_runs_without_errors_or_stderr(executed):
  for cell in executed.cells:
    if cell.cell_type == "code":
      kinds = [kind for kind, _ in _outputs(cell)]
      assert "error" not in kinds
      assert "stderr" not in kinds, cell.source  # no warnings on GitHub either


def test_notebook_has_sections_a_to_e_and_plots(executed):
  headings = [
    line
    for cell in executed.cells
    if cell.cell_type == "markdown"
    for line in cell.source.splitlines()
    if line.startswith("## ")
  ]
  assert [h[3:6] for h in headings] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
  images = sum(kind == "image" for cell in executed.cells for kind, _ in _outputs(cell))
  assert images == 3  # accuracy/loss curves, decay schedule, bf16 average


def test_notebook_reproduces_tfa_numbers(executed):
  # TFA's moving_average_test.py: var0 [1, 2], var1 [3, 4], sgd(2.0), decay 0.5.
  text = _text(executed)
  assert "var0: params [0.6000, 1.6000], average [0.7500, 1.7500]" in text
  assert "var1: params [2.9600, 3.9600], average [2.9750, 3.9750]" in text


def test_notebook_shows_the_stuck_nearest_bf16_average_and_the_stochastic_one(executed):
  text = _text(executed)
  (line,) = [x for x in text.splitlines() if "bfloat16 nearest" in x]
  # A 0.999 EMA of a parameter climbing linearly from 1 to 3 over 3000 steps,
  # in float64: a - (a - x) * 0.001 with x_t = 1 + 2 t / 3000 (bf16-rounded
  # in the notebook, which moves the result by well under 0.01).
  a = 1.0
  for t in range(1, 3001):
    a -= (a - (1 + 2 * t / 3000)) * 0.001
  assert float(re.search(r"exact EMA ([0-9.]+)", line).group(1)) == pytest.approx(
    a, abs=0.01
  )
  assert "bfloat16 nearest 1.0000" in line
  stochastic = float(re.search(r"bfloat16 stochastic ([0-9.]+)", line).group(1))
  assert stochastic == pytest.approx(a, abs=0.05)  # a few bfloat16 places
  assert "will not move" in text  # the construction-time warning is shown


def test_committed_notebook_is_saved_with_the_same_outputs(executed):
  committed = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in committed.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  fresh = [c for c in executed.cells if c.cell_type == "code"]
  for old, new in zip(code, fresh, strict=True):
    assert [k for k, _ in _outputs(old)] == [k for k, _ in _outputs(new)]
