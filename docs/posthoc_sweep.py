"""The post-hoc sweep on scikit-learn's digits: docs/posthoc_sweep.png.

One training run of a small MLP with deliberately noisy SGD (batches of 4),
``power_ema`` tracking sigma_rel 0.05 and 0.10 and a snapshot every 50 of
1000 steps (the setup of notebooks/posthoc.ipynb), then
``posthoc.sweep`` over 17 widths from 0.01 to 0.25 and
``posthoc.plot_sweep`` of the test loss. Prints one line per width and the
best one. Needs the ``demo`` extra (scikit-learn, matplotlib)::

  python docs/posthoc_sweep.py              # writes docs/posthoc_sweep.png
  python docs/posthoc_sweep.py --out x.png
"""

import argparse
import itertools
import pathlib
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_ema
from optax_ema import posthoc

SIGMA_RELS = (0.05, 0.10)
STEPS, BATCH, EVERY = 1000, 4, 50
WIDTHS = [float(s) for s in np.round(np.geomspace(0.01, 0.25, 17), 4)]
OUT = pathlib.Path(__file__).resolve().parent / "posthoc_sweep.png"


def _data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target, test_size=0.3, random_state=0, stratify=digits.target
  )
  return [jnp.asarray(a) for a in (x_train, x_test, y_train, y_test)]


def _init(key, sizes=(64, 128, 10)):
  params = []
  for n_in, n_out in itertools.pairwise(sizes):
    key, sub = jax.random.split(key)
    w = jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)
    params.append({"w": w, "b": jnp.zeros(n_out)})
  return params


def _apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def run(snapshot_dir):
  """Trains, snapshots into ``snapshot_dir``, sweeps; returns the rows."""
  x_train, x_test, y_train, y_test = _data()
  tx = optax_ema.power_ema(
    optax.sgd(0.05, momentum=0.9), sigma_rels=SIGMA_RELS
  )

  @jax.jit
  def train_step(params, state, key):
    idx = jax.random.randint(key, (BATCH,), 0, x_train.shape[0])
    loss = lambda p: _xent(_apply(p, x_train[idx]), y_train[idx])
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def evaluate(params):
    logits = _apply(params, x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return {"test loss": _xent(logits, y_test), "test accuracy": accuracy}

  params = _init(jax.random.key(0))
  state = tx.init(params)
  key = jax.random.key(1)
  with posthoc.SnapshotWriter(snapshot_dir, every=EVERY) as writer:
    for step in range(1, STEPS + 1):
      key, sub = jax.random.split(key)
      params, state = train_step(params, state, sub)
      writer(state, step)
  return posthoc.sweep(snapshot_dir, WIDTHS, evaluate, like=params)


def figure(rows, snapshot_dir):
  """The sweep's test loss against sigma_rel, the lowest one starred."""
  fig = posthoc.plot_sweep(rows, tracked=snapshot_dir, key="test loss")
  best = min(rows, key=lambda r: r.value["test loss"])
  ax = fig.axes[0]
  label = f"lowest: sigma_rel {best.sigma_rel:g}"
  loss = best.value["test loss"]
  ax.plot(best.sigma_rel, loss, "*", ms=14, color="C2", label=label)
  ax.legend(fontsize=8)
  ax.set_title(
    f"digits MLP, {STEPS} steps, {STEPS // EVERY} snapshots: post-hoc sweep"
  )
  return fig


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as d:
    snapshot_dir = pathlib.Path(d) / "snapshots"
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      rows = run(snapshot_dir)
    for w in caught:
      print(f"warning: {w.message}")
    print(
      f"{'sigma_rel':>9} {'fit error':>9} {'test loss':>9} {'accuracy':>8}"
    )
    for r in rows:
      loss, accuracy = r.value["test loss"], r.value["test accuracy"]
      print(
        f"{r.sigma_rel:9.4f} {r.fit_error:9.1e} {loss:9.4f} {accuracy:8.4f}"
      )
    best = min(rows, key=lambda r: r.value["test loss"])
    print(f"lowest test loss at sigma_rel={best.sigma_rel:g}")
    figure(rows, snapshot_dir).savefig(args.out, dpi=110)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
