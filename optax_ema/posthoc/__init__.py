"""Post-hoc EMA: choose the averaging width after training (Karras et al., EDM2).

Train once with :func:`optax_ema.power_ema` tracking two power-function
profiles (e.g. ``sigma_rel=(0.05, 0.10)``), save snapshots of them every few
thousand steps with :class:`SnapshotWriter` (or :func:`save_snapshot`), and
afterwards synthesize the average of any other profile width with
:func:`reconstruct`: a least-squares fit of the target profile by the stored
ones (EDM2's Algorithm 3), normalised as in the released EDM2 code.
:func:`sweep` evaluates many widths and :func:`plot_sweep` draws the curve.
From the command line::

  python -m optax_ema.posthoc DIR --list
  python -m optax_ema.posthoc DIR --sigma-rel 0.07 --out OUT

Snapshots are Orbax checkpoints (format ``optax_ema.posthoc/3``): a snapshot
is the committed step ``PowerEmaState.count`` of an Orbax checkpoint
directory, holding two items,

- ``power_ema``: a PyTree checkpoint ``{repr(sigma_rel): profile}``, each
  profile a tree like the parameters: floating point averages in the
  storage dtype (float16 by default), other arrays (integers) as their
  latest value, ``None`` at masked-out, ``None`` and PRNG-key leaves;
- ``power_ema_meta``: JSON ``{"format", "step", "keys", "sigma_rels",
  "dtype", "run"}``, ``run`` the identity of the training run.

A directory belongs to one training run (:class:`SnapshotRun`): its writer
locks it, refuses another run's snapshots unless told to continue that run
(``resume_from=``), and :func:`load_snapshots` refuses to combine runs.
Directories of format ``optax_ema.posthoc/2`` (no run identity) are still
read.

Orbax writes each step into a temporary directory and commits it by an atomic
rename, so a step that is not committed is never read. Each process writes
its own shards, and :func:`reconstruct` with ``like=`` restores each leaf
directly into its target sharding.

References:
  Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving
  the Training Dynamics of Diffusion Models", CVPR 2024 (EDM2), section 3 and
  appendix C.3 (Algorithm 3); NVlabs/edm2, ``training/phema.py``.
"""

from optax_ema._power_math import gamma_to_sigma_rel
from optax_ema._power_math import sigma_rel_to_ema_decay
from optax_ema._power_math import sigma_rel_to_gamma
from optax_ema.posthoc._cli import main
from optax_ema.posthoc._items import snapshot_items
from optax_ema.posthoc._reconstruct import reconstruct
from optax_ema.posthoc._run import SnapshotRun
from optax_ema.posthoc._snapshots import Snapshot
from optax_ema.posthoc._snapshots import load_snapshots
from optax_ema.posthoc._solver import ReconstructionWeights
from optax_ema.posthoc._solver import reconstruction_weights
from optax_ema.posthoc._solver import solve_weights
from optax_ema.posthoc._sweep import SweepRow
from optax_ema.posthoc._sweep import plot_sweep
from optax_ema.posthoc._sweep import sweep
from optax_ema.posthoc._writer import SnapshotWriter
from optax_ema.posthoc._writer import save_snapshot
from optax_ema.posthoc._writer import wait_until_finished

__all__ = [
  "ReconstructionWeights",
  "Snapshot",
  "SnapshotRun",
  "SnapshotWriter",
  "SweepRow",
  "gamma_to_sigma_rel",
  "load_snapshots",
  "main",
  "plot_sweep",
  "reconstruct",
  "reconstruction_weights",
  "save_snapshot",
  "sigma_rel_to_ema_decay",
  "sigma_rel_to_gamma",
  "snapshot_items",
  "solve_weights",
  "sweep",
  "wait_until_finished",
]
