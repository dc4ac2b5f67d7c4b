"""``python -m optax_ema.posthoc``: list snapshots, or reconstruct one width."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_ema.posthoc import _reconstruct
from optax_ema.posthoc import _snapshots
from optax_ema.posthoc import _solver
from optax_ema.posthoc._orbax import ocp


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m optax_ema.posthoc",
    description="Synthesize a power-function EMA of any width from snapshots "
    "saved by optax_ema.posthoc (Karras et al., EDM2, Algorithm 3).",
  )
  parser.add_argument("directory", nargs="?", help="the snapshot directory")
  parser.add_argument(
    "--snapshots",
    dest="snapshots",
    help="the snapshot directory (instead of the positional argument)",
  )
  parser.add_argument(
    "--list", action="store_true", help="list steps and profiles, read no arrays"
  )
  parser.add_argument("--sigma-rel", type=float, help="the target width")
  parser.add_argument("--step", type=int, default=None, help="target step (last)")
  parser.add_argument("--out", help="output Orbax checkpoint directory")
  return parser


def _list(snaps: Sequence[_snapshots.Snapshot]) -> None:
  flat = ocp.tree.to_flat_dict(snaps[0].tree)
  size = sum(int(np.prod(v.shape)) for v in flat.values())
  print(f"{len(snaps)} snapshots, {len(flat)} stored leaves, {size} values each")
  # load_snapshots refuses several runs: the snapshots share one.
  run = snaps[0].run
  print(f"run: {run if run is not None else 'none (format optax_ema.posthoc/2)'}")
  print(f"{'step':>12}  {'dtype':>8}  sigma_rels")
  for s in snaps:
    sigmas = ", ".join(f"{x:g}" for x in s.sigma_rels)
    print(f"{s.step:>12d}  {s.dtype:>8}  {sigmas}")


def _print_weights(weights: _solver.ReconstructionWeights) -> None:
  print(f"target: sigma_rel={weights.sigma_rel:g} at step {weights.step}")
  print(f"{'step':>12}  {'sigma_rel':>9}  {'coefficient':>14}")
  for t, s, c in zip(
    weights.snapshot_steps,
    weights.snapshot_sigma_rels,
    weights.coefficients,
    strict=True,
  ):
    print(f"{int(t):>12d}  {s:>9.4f}  {c:>14.6e}")
  print(f"fit error (relative L2 of the profile): {weights.fit_error:.3e}")


def _write(
  out: pathlib.Path, params: Any, weights: _solver.ReconstructionWeights
) -> int:
  metadata = {
    "sigma_rel": weights.sigma_rel,
    "step": weights.step,
    "fit_error": weights.fit_error,
  }
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out, params, custom_metadata=metadata)
    checkpointer.wait_until_finished()
  return len(ocp.tree.to_flat_dict(params))


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: ``python -m optax_ema.posthoc DIR --sigma-rel S --out OUT``.

  ``--list`` prints the run identity, the snapshot steps and tracked
  profiles (no array is read). Otherwise prints the coefficient of every
  stored profile and the fit error, and writes the synthesized parameters
  (NumPy, the stored structure) to ``--out`` as an Orbax checkpoint (restore
  it with
  ``ocp.StandardCheckpointer().restore(OUT)``; its custom metadata holds
  ``sigma_rel``, ``step`` and ``fit_error``).

  Args:
    argv: the arguments (default: ``sys.argv[1:]``): the snapshot directory
      (or ``--snapshots DIR``, not both), then ``--list``, or
      ``--sigma-rel FLOAT`` and ``--out DIR`` and optionally ``--step INT``
      (a snapshot step; default: the last one).

  Returns:
    The exit status (0 on success, 2 on bad input).

  Examples:
    >>> import pathlib
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   snaps = pathlib.Path(d) / "snaps"
    ...   with posthoc.SnapshotWriter(snaps, every=20) as w:
    ...     for step in range(1, 41):
    ...       updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...       params = optax.apply_updates(params, updates)
    ...       _ = w(state, step)
    ...   status = posthoc.main([f"{d}/snaps", "--list"])
    ...   status = posthoc.main(
    ...     [f"{d}/snaps", "--sigma-rel", "0.07", "--out", f"{d}/ema"]
    ...   )
    2 snapshots, 1 stored leaves, 2 values each
    run: ...
            step     dtype  sigma_rels
              20   float16  0.05, 0.1
              40   float16  0.05, 0.1
    target: sigma_rel=0.07 at step 40
            step  sigma_rel     coefficient
              20     0.0500    8.8...e-05
              20     0.1000   -2.1...e-03
              40     0.0500    4.39...e-01
              40     0.1000    5.62...e-01
    fit error (relative L2 of the profile): 5...e-02
    wrote 1 arrays to .../ema
  """
  parser = _parser()
  args = parser.parse_args(argv)
  if args.directory is not None and args.snapshots is not None:
    parser.print_usage(sys.stderr)
    print(
      f"error: the snapshot directory is given twice ({args.directory!r} and "
      f"--snapshots {args.snapshots!r}): give it once, as DIR or --snapshots DIR",
      file=sys.stderr,
    )
    return 2
  directory = args.directory or args.snapshots
  if directory is None:
    parser.print_usage(sys.stderr)
    print("error: give the snapshot directory", file=sys.stderr)
    return 2
  given = [
    flag
    for flag, value in (
      ("--sigma-rel", args.sigma_rel),
      ("--step", args.step),
      ("--out", args.out),
    )
    if value is not None
  ]
  if args.list and given:
    parser.print_usage(sys.stderr)
    print(
      f"error: --list reads no arrays, so {', '.join(given)} would be ignored: "
      "give --list alone, or --sigma-rel and --out without it",
      file=sys.stderr,
    )
    return 2
  if not args.list and (args.sigma_rel is None or args.out is None):
    parser.print_usage(sys.stderr)
    print("error: give --list, or --sigma-rel and --out", file=sys.stderr)
    return 2
  try:
    snaps = _snapshots.load_snapshots(directory)
    if args.list:
      _list(snaps)
      return 0
    out = pathlib.Path(args.out).resolve()
    if out.exists():
      raise ValueError(f"`--out` {str(out)!r} exists already: choose a new path.")
    weights = _solver.select_weights(snaps, args.sigma_rel, args.step)
    params = _reconstruct.combine(snaps, weights)
  except (ValueError, TypeError) as err:
    # The messages name the function's arguments; here they are flags.
    message = str(err)
    for name in ("step", "sigma_rel"):
      message = message.replace(f"`{name}`", f"`--{name.replace('_', '-')}`")
    print(f"error: {message}", file=sys.stderr)
    return 2
  _print_weights(weights)
  count = _write(out, params, weights)
  print(f"wrote {count} arrays to {out}")
  return 0
