"""The demo CLI: ``python -m optax_ema.demo``."""

import io
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

from optax_ema import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_DEMO_COMMAND = (
  'python3 -m venv .venv && .venv/bin/pip install ".[demo]" '
  "&& .venv/bin/python -m optax_ema.demo"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_demo(*args, cwd):
  return subprocess.run(
    [sys.executable, "-m", "optax_ema.demo", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def _default_args(**overrides):
  args = demo.build_parser().parse_args([])
  for name, value in overrides.items():
    setattr(args, name, value)
  return args


def test_readme_demo_command_is_the_documented_one():
  lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
  after = lines[lines.index("<!-- demo-command -->") + 1 :]
  command = next(x for x in after if x.strip() and not x.startswith("```"))
  assert command.removeprefix("$ ") == README_DEMO_COMMAND


@pytest.mark.subprocess
def test_short_run_without_plot_end_to_end(tmp_path):
  result = _run_demo("--steps", "50", "--no-plot", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  out = result.stdout
  # Not a terminal: the progress bar degrades to plain lines, ending at 100%.
  assert "\r" not in out
  assert "step 50/50 (100%)" in out
  table = (tmp_path / "demo_out" / "demo_table.txt").read_text(encoding="utf-8")
  assert table in out
  rows = [line.split() for line in table.splitlines() if line[:6].strip().isdigit()]
  assert [int(row[0]) for row in rows] == [2, 5, 12, 25, 38, 50]
  for row in rows:
    accuracies = [float(x.rstrip("%")) for x in row[2:4]]
    losses = [float(x) for x in row[4:6]]
    assert all(0.0 <= a <= 100.0 for a in accuracies)
    assert all(loss > 0.0 for loss in losses)
  assert not (tmp_path / "demo_out" / "demo.png").exists()


def test_run_with_plot_writes_a_valid_png(tmp_path, capsys):
  out = tmp_path / "results"
  assert demo.main(["--steps", "20", "--out", str(out)]) == 0
  png = out / "demo.png"
  assert f"plot written to {png}" in capsys.readouterr().out
  assert png.read_bytes()[:8] == PNG_SIGNATURE
  image = matplotlib.image.imread(png)
  assert image.shape == (380, 1000, 4)  # figsize (10, 3.8) at 100 dpi
  assert image[..., :3].std() > 0.05  # something was drawn


def test_averaged_params_beat_raw_params_at_the_end_on_defaults():
  history = demo.run(_default_args(), progress_stream=io.StringIO())
  assert history.steps[-1] == 3000
  assert history.avg_acc[-1] > history.raw_acc[-1]
  assert history.avg_loss[-1] < history.raw_loss[-1]
  # Before any step the average is the initial params.
  assert history.steps[0] == 0
  assert history.avg_acc[0] == history.raw_acc[0]
  assert history.avg_loss[0] == pytest.approx(history.raw_loss[0], rel=1e-6)
  # The committed table (and the README's copy of it) is what this run
  # prints: the same rows, and numbers equal up to what another CPU's
  # floating point could move over 3000 steps.
  table = demo.format_table(history, _default_args())
  committed = (ROOT / "docs" / "demo_table.txt").read_text(encoding="utf-8")
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert committed.strip() in readme

  def rows(text):
    return [
      [float(x.rstrip("%")) for x in line.split()]
      for line in text.splitlines()
      if line.strip() and line.split()[0].isdigit()
    ]

  fresh, saved = rows(table), rows(committed)
  assert len(fresh) == len(saved) >= 5
  for got, want in zip(fresh, saved, strict=True):
    assert got[:2] == want[:2]  # step and decay
    # The averaged accuracy is what the table shows: within 1.5 points. The
    # raw params bounce with every small batch (up to 4.4 points between
    # neighbouring rows of one run), and another CPU's rounding changes which
    # batch noise they end on, so the raw column is checked within 5 points.
    assert got[3] == pytest.approx(want[3], abs=1.5)  # averaged accuracy
    assert got[2] == pytest.approx(want[2], abs=5.0)  # raw accuracy
    assert got[4:6] == pytest.approx(want[4:6], abs=0.05)  # losses


def test_decay_column_is_the_dynamic_decay_of_the_last_step():
  # moving_average(..., dynamic_decay=True) makes its update number t (t
  # updates before it) with the decay min(D, (1 + t) / (10 + t)); at step 0
  # no update was made yet. With D = 0.5 the cap holds from t = 8 on.
  args = _default_args(steps=30, decay=0.5)
  history = demo.run(args, progress_stream=io.StringIO())
  assert history.steps == list(range(31))
  assert history.decay[0] == 0.0
  want = [min(0.5, (1 + t) / (10 + t)) for t in range(30)]
  assert history.decay[1:] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
  ("argv", "fragment"),
  [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--steps", "ten"], "argument --steps: expected an integer >= 1, got 'ten'"),
    (["--decay", "1.5"], "argument --decay: expected a number in [0, 1)"),
    (["--decay", "nan"], "argument --decay: expected a number in [0, 1)"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
    (["--lr", "-0.1"], "argument --lr: expected a positive number"),
    (["--bogus"], "unrecognized arguments: --bogus"),
  ],
)
def test_bad_argument_is_a_one_line_error_with_exit_code_2(argv, fragment, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1
  assert captured.err.startswith("python -m optax_ema.demo: error: ")
  assert fragment in captured.err


@pytest.mark.subprocess
def test_bad_argument_exits_2_from_the_command_line(tmp_path):
  result = _run_demo("--decay", "2", cwd=tmp_path)
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.splitlines() == [
    "python -m optax_ema.demo: error: argument --decay: expected a number in "
    "[0, 1) such as 0.99, got '2' (see --help)"
  ]


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
  not_a_dir = tmp_path / "file.txt"
  not_a_dir.write_text("x", encoding="utf-8")
  assert demo.main(["--steps", "1", "--no-plot", "--out", str(not_a_dir)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert "--out" in err
  assert "is not a directory" in err


@pytest.mark.parametrize("module", ["flax", "sklearn", "matplotlib"])
def test_missing_demo_extra_prints_install_command(module, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
  assert demo.main(["--steps", "1"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1
  assert 'pip install "optax-ema[demo]"' in captured.err
  assert repr(module) in captured.err


def test_help_works_and_lists_every_flag(capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--steps", "--decay", "--seed", "--optimizer", "--out", "--no-plot"):
    assert flag in text


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_redraws_one_line_on_a_terminal():
  stream = _Terminal()
  progress = demo.Progress(100, stream, width=10)
  for done in range(0, 101, 25):
    progress.update(done)
  progress.close()
  text = stream.getvalue()
  assert text.count("\r") == 5
  assert text.count("\n") == 1 and text.endswith("\n")
  assert "[##########] 100/100" in text


def test_progress_degrades_to_about_ten_plain_lines():
  stream = io.StringIO()
  progress = demo.Progress(1000, stream)
  for done in range(0, 1001, 10):
    progress.update(done)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert len(lines) == 11
  assert lines[0].startswith("step 0/1000 (  0%)")
  assert lines[-1].startswith("step 1000/1000 (100%)")


def test_committed_docs_come_from_the_default_settings():
  table = (ROOT / "docs" / "demo_table.txt").read_text(encoding="utf-8")
  args = _default_args()
  header = demo.format_table(
    demo.History(
      steps=[0, 150, 300, 750, 1500, 2250, 3000],
      decay=[0.0] * 7,
      raw_acc=[0.0] * 7,
      avg_acc=[0.0] * 7,
      raw_loss=[0.0] * 7,
      avg_loss=[0.0] * 7,
    ),
    args,
  ).splitlines()[:3]
  assert table.splitlines()[:3] == header
  steps = [int(line.split()[0]) for line in table.splitlines()[3:9]]
  assert steps == [150, 300, 750, 1500, 2250, 3000]
  png = (ROOT / "docs" / "demo.png").read_bytes()
  assert png[:8] == PNG_SIGNATURE
