"""Raw vs averaged parameters on a real task: ``python -m optax_ema.demo``.

Trains a small Flax MLP on scikit-learn's bundled ``load_digits`` (8x8 images
of handwritten digits, shipped with scikit-learn, so nothing is downloaded)
with a noisy but realistic setup: SGD with momentum (and a little weight
decay), batches of 16 and a fifth of the training labels replaced by wrong
ones. The optimizer is wrapped in :func:`optax_ema.moving_average`, so one run
yields two sets of parameters: the raw ones the optimizer steps through and
their moving average. Both are evaluated on the same held-out (clean) test
split at every evaluation point; the demo prints a table at a few checkpoints,
writes the table to ``<out>/demo_table.txt`` and the curves to
``<out>/demo.png``.

Every number comes from the run itself. The dependencies are in the ``demo``
extra: ``pip install "optax-ema[demo]"``. Run ``python -m optax_ema.demo
--help`` for the flags; ``python -m optax_ema.demo --out docs`` regenerates
the README's plot and table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any
from typing import NoReturn
from typing import TextIO

INSTALL_COMMAND = 'pip install "optax-ema[demo]"'
PROG = "python -m optax_ema.demo"

# Optimizer name -> (optax factory name, default learning rate, extra kwargs).
OPTIMIZERS: dict[str, tuple[str, float, dict[str, Any]]] = {
  "momentum": ("sgd", 0.05, {"momentum": 0.9}),
  "nesterov": ("sgd", 0.05, {"momentum": 0.9, "nesterov": True}),
  "sgd": ("sgd", 0.5, {}),
  "adam": ("adam", 0.003, {}),
}

BATCH_SIZE = 16
LABEL_NOISE = 0.2
TEST_FRACTION = 0.4
HIDDEN = 128
WEIGHT_DECAY = 3e-3
NUM_EVALS = 60  # evaluation points on the curves
TABLE_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # checkpoints in the table


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line (and exit code 2)."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int) -> Any:
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"expected an integer >= {minimum}, got {text!r}"
      ) from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value

  return parse


def _float(text: str) -> float:
  """``text`` as a float, NaN when it is not a number (every check rejects NaN)."""
  try:
    return float(text)
  except ValueError:
    return math.nan


def _decay(text: str) -> float:
  value = _float(text)
  if not 0.0 <= value < 1.0:  # also rejects nan
    raise argparse.ArgumentTypeError(
      f"expected a number in [0, 1) such as 0.99, got {text!r}"
    )
  return value


def _learning_rate(text: str) -> float:
  value = _float(text)
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """Returns the demo's command line parser.

  Bad values (``--steps 0``, ``--decay 1.5``, an unknown ``--optimizer``...)
  make ``parse_args`` print a one-line error to stderr and exit with code 2.

  Returns:
    An ``argparse.ArgumentParser`` for ``--steps``, ``--decay``, ``--seed``,
    ``--optimizer``, ``--lr``, ``--out`` and ``--no-plot``.

  Examples:
    >>> from optax_ema import demo
    >>> parser = demo.build_parser()
    >>> args = parser.parse_args(["--steps", "100", "--no-plot"])
    >>> print(args.steps, f"{args.decay:.2f}", args.optimizer, args.no_plot)
    100 0.99 momentum True
  """
  parser = _Parser(
    prog=PROG,
    description=(
      "Train a small Flax MLP on scikit-learn's bundled digits with a noisy "
      "setup (SGD with momentum and weight decay, batches of 16, 20% train "
      "label noise), wrapped in optax_ema.moving_average, "
      "and compare the raw and the averaged parameters on the test split."
    ),
    epilog=f"Needs the demo extra: {INSTALL_COMMAND}",
  )
  parser.add_argument(
    "--steps",
    type=_int_at_least(1),
    default=3000,
    help="optimizer steps (default: %(default)s)",
  )
  parser.add_argument(
    "--decay",
    type=_decay,
    default=0.99,
    help="average_decay of moving_average, in [0, 1); the demo also sets "
    "dynamic_decay=True (default: %(default)s)",
  )
  parser.add_argument(
    "--seed",
    type=_int_at_least(0),
    default=0,
    help="seed of the initialisation, label noise and batches (default: %(default)s)",
  )
  parser.add_argument(
    "--optimizer",
    choices=sorted(OPTIMIZERS),
    default="momentum",
    help="optimizer to wrap; momentum is SGD with momentum 0.9 (default: %(default)s)",
  )
  parser.add_argument(
    "--lr",
    type=_learning_rate,
    default=None,
    help="learning rate (default: "
    + ", ".join(f"{k} {v[1]:g}" for k, v in sorted(OPTIMIZERS.items()))
    + ")",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("demo_out"),
    help="directory for demo.png and demo_table.txt (default: %(default)s)",
  )
  parser.add_argument(
    "--no-plot",
    action="store_true",
    help="do not draw demo.png (and do not import matplotlib)",
  )
  return parser


class Progress:
  """A small text progress bar that degrades to plain lines off a terminal.

  On a terminal (``stream.isatty()``), each :meth:`update` redraws one line
  (``\\r``); otherwise, e.g. when the output is piped to a file or a CI log, it
  writes a plain line about every 10% of ``total``.

  Args:
    total: the number of steps of the whole run.
    stream: where to write; ``sys.stdout`` if None.
    width: the bar's width in characters, on a terminal.

  Examples:
    >>> import io
    >>> from optax_ema import demo
    >>> stream = io.StringIO()  # not a terminal: plain lines
    >>> progress = demo.Progress(100, stream)
    >>> for done in range(0, 101, 5):
    ...   progress.update(done)
    >>> progress.close()
    >>> lines = stream.getvalue().splitlines()
    >>> print(len(lines), lines[-1][:19])
    11 step 100/100 (100%)
  """

  def __init__(self, total: int, stream: TextIO | None = None, width: int = 30):
    self.total = max(total, 1)
    self.stream = sys.stdout if stream is None else stream
    self.width = width
    isatty = getattr(self.stream, "isatty", None)
    self.tty = bool(isatty and isatty())
    self._next_line = 0
    self._start = time.perf_counter()

  def update(self, done: int, note: str = "") -> None:
    """Shows that ``done`` of ``total`` steps are finished."""
    fraction = min(done / self.total, 1.0)
    elapsed = time.perf_counter() - self._start
    if self.tty:
      filled = round(self.width * fraction)
      bar = "#" * filled + "-" * (self.width - filled)
      self.stream.write(
        f"\r[{bar}] {done:>{len(str(self.total))}}/{self.total} "
        f"{elapsed:5.1f}s {note}\x1b[K"
      )
      self.stream.flush()
    elif done >= self._next_line or done >= self.total:
      self.stream.write(
        f"step {done}/{self.total} ({100 * fraction:3.0f}%) {elapsed:.1f}s {note}\n"
      )
      self.stream.flush()
      self._next_line = done + max(self.total // 10, 1)

  def close(self) -> None:
    """Ends the bar's line on a terminal."""
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


@dataclasses.dataclass
class History:
  """What :func:`run` measured, one entry per evaluation point.

  Attributes:
    steps: the number of optimizer steps done at each evaluation point.
    decay: the decay the average used on the last of those steps, as
      :func:`optax_ema.diagnostics` reports it (0 before the first step).
    raw_acc: test accuracy (a fraction) of the raw parameters.
    avg_acc: test accuracy of the averaged parameters.
    raw_loss: mean test cross-entropy of the raw parameters.
    avg_loss: mean test cross-entropy of the averaged parameters.

  Examples:
    >>> from optax_ema import demo
    >>> history = demo.History(steps=[0, 100], avg_acc=[0.1, 0.9])
    >>> print(history.steps[-1], history.avg_acc[-1], history.raw_acc)
    100 0.9 []
  """

  steps: list[int] = dataclasses.field(default_factory=list)
  decay: list[float] = dataclasses.field(default_factory=list)
  raw_acc: list[float] = dataclasses.field(default_factory=list)
  avg_acc: list[float] = dataclasses.field(default_factory=list)
  raw_loss: list[float] = dataclasses.field(default_factory=list)
  avg_loss: list[float] = dataclasses.field(default_factory=list)


def _missing_extra(no_plot: bool) -> str | None:
  """The first module of the demo extra that cannot be imported, if any."""
  modules = ["flax", "sklearn"] + ([] if no_plot else ["matplotlib"])
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError:
      return name
  return None


def _load_data(seed: int) -> tuple[Any, Any, Any, Any]:
  """Digits split 60/40 (fixed split), with label noise on the train split."""
  import numpy as np
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=TEST_FRACTION, stratify=y, random_state=0
  )
  rng = np.random.default_rng(seed)
  noisy = rng.random(len(y_train)) < LABEL_NOISE
  shift = rng.integers(1, 10, size=len(y_train))  # a wrong label, uniformly
  y_train = np.where(noisy, (y_train + shift) % 10, y_train).astype(np.int32)
  return x_train, y_train, x_test, y_test


def _setup(args: argparse.Namespace, data: list[Any]) -> tuple[Any, Any, Any, Any]:
  """The model's TrainState, the data key, and the jitted train / evaluate.

  ``evaluate`` returns the raw and averaged params' test accuracy and loss,
  and the decay of the average's last step (from
  :func:`optax_ema.diagnostics`).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  import optax_ema

  x_train, y_train, x_test, y_test = data

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      x = nn.relu(nn.Dense(HIDDEN)(x))
      return nn.Dense(10)(x)

  model = MLP()
  factory, default_lr, kwargs = OPTIMIZERS[args.optimizer]
  lr = default_lr if args.lr is None else args.lr
  optimizer = optax.chain(
    optax.add_decayed_weights(WEIGHT_DECAY), getattr(optax, factory)(lr, **kwargs)
  )
  tx = optax_ema.moving_average(optimizer, args.decay, dynamic_decay=True)
  init_key, data_key = jax.random.split(jax.random.key(args.seed))
  params = model.init(init_key, x_train[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(state: Any, key: jax.Array, num_steps: jax.Array) -> Any:
    def body(_: Any, state: Any) -> Any:
      batch_key = jax.random.fold_in(key, state.step)
      idx = jax.random.randint(batch_key, (BATCH_SIZE,), 0, x_train.shape[0])
      grads = jax.grad(loss_fn)(state.params, x_train[idx], y_train[idx])
      return state.apply_gradients(grads=grads)

    return jax.lax.fori_loop(0, num_steps, body, state)

  @jax.jit
  def evaluate(state: Any) -> tuple[jax.Array, jax.Array]:
    def metrics(params: Any) -> jax.Array:
      logits: Any = model.apply({"params": params}, x_test)  # no mutable state
      acc = jnp.mean(jnp.argmax(logits, -1) == y_test)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
      return jnp.stack([acc, loss])

    averaged = optax_ema.averaged_params(state.opt_state, state.params)
    decay = optax_ema.diagnostics(state.opt_state, state.params)["decay"]
    return jnp.stack([metrics(state.params), metrics(averaged)]), decay

  return state, data_key, train, evaluate


def run(args: argparse.Namespace, progress_stream: TextIO | None = None) -> History:
  """Trains once, evaluating the raw and the averaged params along the way.

  A two-layer Flax MLP (128 hidden units) is trained with
  ``moving_average(optimizer, args.decay, dynamic_decay=True)`` for
  ``args.steps`` steps of batches of 16 drawn (with replacement) from the
  noisy training split. At about 60 evenly spaced points and at the table's
  checkpoints, the current raw parameters and
  ``optax_ema.averaged_params(opt_state, params)`` are both evaluated on the
  clean test split.

  Args:
    args: parsed flags, as from ``build_parser().parse_args()``.
    progress_stream: where the progress bar goes; ``sys.stdout`` if None.

  Returns:
    A :class:`History` of the measurements, starting at step 0.

  Examples:
    >>> import io
    >>> from optax_ema import demo
    >>> args = demo.build_parser().parse_args(["--steps", "3"])
    >>> history = demo.run(args, progress_stream=io.StringIO())
    >>> print(history.steps)
    [0, 1, 2, 3]
    >>> print(history.raw_acc[0] == history.avg_acc[0])  # no step yet
    True
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  data = [jnp.asarray(a) for a in _load_data(args.seed)]
  x_train, _, x_test, _ = data
  state, data_key, train, evaluate = _setup(args, data)

  eval_steps = sorted(
    set(np.linspace(0, args.steps, NUM_EVALS + 1).round().astype(int).tolist())
    | {_table_step(args.steps, f) for f in TABLE_FRACTIONS}
  )
  history = History()
  progress = Progress(args.steps, progress_stream)
  progress.stream.write(
    f"training {args.steps} steps on digits ({x_train.shape[0]} noisy train / "
    f"{x_test.shape[0]} test images) on {jax.default_backend()}, evaluating "
    f"raw and averaged params {len(eval_steps)} times\n"
  )
  done = 0
  for step in eval_steps:
    state = train(state, data_key, jnp.asarray(step - done, jnp.int32))
    done = step
    measured, decay = evaluate(state)
    (raw_acc, raw_loss), (avg_acc, avg_loss) = np.asarray(measured).tolist()
    history.steps.append(step)
    history.decay.append(float(decay))
    history.raw_acc.append(raw_acc)
    history.avg_acc.append(avg_acc)
    history.raw_loss.append(raw_loss)
    history.avg_loss.append(avg_loss)
    progress.update(step, f"test acc raw {raw_acc:.1%} avg {avg_acc:.1%}")
  progress.close()
  return history


def _table_step(steps: int, fraction: float) -> int:
  """The step of the table row at ``fraction`` of the run (at least 1)."""
  return max(1, round(steps * fraction))


def format_table(history: History, args: argparse.Namespace) -> str:
  """Formats the checkpoint table: raw vs averaged test accuracy and loss.

  Args:
    history: the measurements of :func:`run`.
    args: the flags the run used (shown in the table's first line).

  Returns:
    The table as text: a line of settings, a row per checkpoint (at 5%, 10%,
    25%, 50%, 75% and 100% of the run) and a summary line, ending with a
    newline.

  Examples:
    >>> from optax_ema import demo
    >>> args = demo.build_parser().parse_args(["--steps", "1"])
    >>> history = demo.History([0, 1], [0.0, 0.1], [0.1, 0.5], [0.1, 0.75],
    ...                        [2.3, 1.5], [2.3, 1.25])
    >>> last = demo.format_table(history, args).splitlines()[-1]
    >>> print(last.split(": ")[1])
    test accuracy +25.00 points, test loss -0.2500
  """
  rows = sorted({_table_step(args.steps, f) for f in TABLE_FRACTIONS})
  lr = OPTIMIZERS[args.optimizer][1] if args.lr is None else args.lr
  lines = [
    f"digits, {args.optimizer} lr={lr:g} wd={WEIGHT_DECAY:g}, batch {BATCH_SIZE}, "
    f"{LABEL_NOISE:.0%} train label noise, seed {args.seed}; "
    f"moving_average(decay={args.decay:g}, dynamic_decay=True)",
    "",
    f"{'step':>6}  {'decay':>6}  {'acc raw':>8}  {'acc avg':>8}  "
    f"{'loss raw':>8}  {'loss avg':>8}",
  ]
  for step in rows:
    i = history.steps.index(step)
    lines.append(
      f"{step:>6}  {history.decay[i]:>6.4f}  {history.raw_acc[i]:>8.2%}  "
      f"{history.avg_acc[i]:>8.2%}  {history.raw_loss[i]:>8.4f}  "
      f"{history.avg_loss[i]:>8.4f}"
    )
  acc_gain = 100 * (history.avg_acc[-1] - history.raw_acc[-1])
  loss_gain = history.avg_loss[-1] - history.raw_loss[-1]
  lines += [
    "",
    f"at step {history.steps[-1]}, averaged vs raw: test accuracy "
    f"{acc_gain:+.2f} points, test loss {loss_gain:+.4f}",
  ]
  return "\n".join(lines) + "\n"


def _plot(history: History, args: argparse.Namespace, path: pathlib.Path) -> None:
  """Writes raw vs averaged test accuracy and loss curves to ``path``."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 3.8), layout="constrained")
  ax_acc, ax_loss = fig.subplots(1, 2)
  steps = history.steps
  for ax, raw, avg, name in (
    (ax_acc, history.raw_acc, history.avg_acc, "test accuracy"),
    (ax_loss, history.raw_loss, history.avg_loss, "test loss"),
  ):
    ax.plot(steps, raw, color="tab:gray", lw=1.2, label="raw params")
    ax.plot(steps, avg, color="tab:blue", lw=2, label="averaged params")
    ax.set_xlabel("step")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  ax_acc.set_ylim(max(0.0, min(history.raw_acc[len(steps) // 10 :]) - 0.03), 1.0)
  ax_loss.set_ylim(0.0, 1.3 * max(history.raw_loss[len(steps) // 10 :]))
  ax_acc.legend(loc="lower right")
  fig.suptitle(
    f"optax_ema.moving_average(decay={args.decay:g}) on digits "
    f"({args.optimizer}, batch {BATCH_SIZE}, {LABEL_NOISE:.0%} label noise)"
  )
  fig.savefig(path, dpi=100, metadata={"Software": None})


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the demo: ``python -m optax_ema.demo [flags]``.

  Trains (see :func:`run`), prints the table (see :func:`format_table`) and
  writes it to ``<out>/demo_table.txt``, and, unless ``--no-plot``, draws the
  curves to ``<out>/demo.png``. A missing module of the ``demo`` extra is a
  one-line message with the install command and exit code 2.

  Args:
    argv: the flags; ``sys.argv[1:]`` if None.

  Returns:
    The exit code: 0 on success, 2 when the ``demo`` extra is missing or
    ``--out`` is not a directory. Bad flags raise ``SystemExit(2)`` after a
    one-line message.

  Examples:
    >>> from optax_ema import demo
    >>> try:
    ...   demo.main(["--decay", "1.5"])  # the message goes to stderr
    ... except SystemExit as exit:
    ...   print(exit.code)
    2
  """
  args = build_parser().parse_args(argv)
  missing = _missing_extra(args.no_plot)
  if missing is not None:
    print(
      f"{PROG}: the demo needs the 'demo' extra (no module {missing!r}); "
      f"install it with: {INSTALL_COMMAND}",
      file=sys.stderr,
    )
    return 2
  if args.out.exists() and not args.out.is_dir():
    print(f"{PROG}: error: --out {str(args.out)!r} is not a directory", file=sys.stderr)
    return 2
  start = time.perf_counter()
  history = run(args)
  seconds = time.perf_counter() - start
  table = format_table(history, args)
  print()
  print(table, end="")
  print(f"\ntrained and evaluated in {seconds:.1f}s")
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "demo_table.txt").write_text(table, encoding="utf-8")
  print(f"table written to {os.fspath(args.out / 'demo_table.txt')}")
  if not args.no_plot:
    _plot(history, args, args.out / "demo.png")
    print(f"plot written to {os.fspath(args.out / 'demo.png')}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except BrokenPipeError:  # e.g. `python -m optax_ema.demo | head`
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
