"""The least-squares fit of a target power-function profile (EDM2 Algorithm 3).

A snapshot of profile :math:`\\gamma_k` taken at step :math:`t_k` is the
average of the parameters under the weight function
:math:`p_k(\\tau) = (\\gamma_k + 1)\\,\\tau^{\\gamma_k} / t_k^{\\gamma_k + 1}` on
:math:`[0, t_k]` (the discrete power EMA gives update :math:`i` exactly the
integral of :math:`p_k` over :math:`[i - 1, i]`). A combination
:math:`\\sum_k c_k p_k` closest (in :math:`L^2`) to the target profile
:math:`p_r` solves :math:`A c = b` with :math:`A_{kl} = \\langle p_k, p_l\\rangle`
and :math:`b_k = \\langle p_k, p_r\\rangle`, inner products in closed form.
As in the released EDM2 code, the solution is then divided by its sum, so a
parameter that never changes is reconstructed exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from optax_ema import _power_math
from optax_ema import _validation
from optax_ema import _warn
from optax_ema.posthoc import _snapshots

# A target whose profile the stored ones fit with a relative L2 error above
# this is reconstructed with a UserWarning. The error is that of the weight
# profile over time, ||p - sum_k c_k p_k|| / ||p||, not of the parameters: it
# is 0 for a tracked width at a snapshot step and depends only on the
# snapshot steps and widths. In notebooks/posthoc.ipynb (two tracked widths,
# 0.05 and 0.10, 20 snapshots), targets fit to 6.5e-2 or better (sigma_rel
# 0.0224 to 0.25) have test losses that follow the trend of their neighbours,
# while 0.01 fits to 0.30 and sits at the edge of what the stored profiles
# can express; the benchmark's extrapolations with 2 snapshots fit to 0.23.
# 0.1 separates the two: a warning means "a synthesized profile that differs
# from the asked one by more than a tenth of its size".
FIT_ERROR_WARNING = 0.1


class ReconstructionWeights(NamedTuple):
  """The coefficients that combine stored profiles into a target one.

  Attributes:
    step: the step the target profile ends at (a snapshot step).
    sigma_rel: the target width.
    snapshot_steps: int64 vector, the step of each stored profile used.
    snapshot_sigma_rels: float64 vector, the width of each one.
    coefficients: float64 vector, the weight of each one; they sum to one.
    fit_error: the relative L2 distance between the target profile and the
      combination of stored profiles with these coefficients, as functions of
      time (``||p - sum_k c_k p_k|| / ||p||``; 0 is exact).

  Examples:
    >>> import numpy as np
    >>> from optax_ema import posthoc
    >>> w = posthoc.ReconstructionWeights(
    ...   10, 0.1, np.array([10]), np.array([0.1]), np.array([1.0]), 0.0
    ... )
    >>> print(w.step, w.coefficients, f"{w.fit_error:.1f}")
    10 [1.] 0.0
  """

  step: int
  sigma_rel: float
  snapshot_steps: np.ndarray
  snapshot_sigma_rels: np.ndarray
  coefficients: np.ndarray
  fit_error: float


def _profile_dot(t_a: Any, g_a: Any, t_b: Any, g_b: Any) -> np.ndarray:
  """``<p_a, p_b>`` for profiles ending at ``t_a``, ``t_b``, broadcasting.

  The integral of the product is ``(g_a + 1)(g_b + 1) / (g_a + g_b + 1)``
  times ``min(t_a, t_b)**(g_a + g_b + 1) / (t_a**(g_a + 1) t_b**(g_b + 1))``,
  evaluated through logarithms to stay finite for large exponents.
  """
  m = np.minimum(t_a, t_b)
  s = g_a + g_b + 1.0
  log = s * np.log(m) - (g_a + 1.0) * np.log(t_a) - (g_b + 1.0) * np.log(t_b)
  return (g_a + 1.0) * (g_b + 1.0) / s * np.exp(log)


def solve_weights(
  steps: ArrayLike,
  gammas: ArrayLike,
  target_step: float,
  target_gamma: float,
) -> tuple[np.ndarray, float]:
  """Coefficients that combine stored profiles into a target profile.

  Solves :math:`A x = b` (module docstring) and returns
  :math:`c = x / \\sum_k x_k`, the normalisation of the released EDM2 code:
  the coefficients sum to one, so a constant parameter comes back unchanged.

  Args:
    steps: the end step of each stored profile (> 0).
    gammas: the exponent of each stored profile.
    target_step: the end step of the target profile.
    target_gamma: the exponent of the target profile.

  Returns:
    ``(coefficients, fit_error)``: float64 coefficients, one per stored
    profile, summing to one, and the relative L2 error
    :math:`\\|p_r - \\sum_k c_k p_k\\| / \\|p_r\\|` of these coefficients.

  Raises:
    ValueError: the system is singular (the same profile stored twice) or its
      solution sums to zero.

  Examples:
    >>> import numpy as np
    >>> from optax_ema import posthoc
    >>> steps, gammas = [50, 100, 100], [6.94, 6.94, 16.97]
    >>> c, err = posthoc.solve_weights(steps, gammas, 100, 6.94)
    >>> print(np.round(c, 3) + 0.0)  # + 0.0 turns a rounded -0.0 into 0.0
    [0. 1. 0.]
    >>> print(err < 1e-7)  # zero up to the rounding of the quadratic form
    True

  References:
    Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024, appendix C.3, Algorithm 3; the released
    code (NVlabs/edm2, ``training/phema.py``) normalises the solution.
  """
  t = np.asarray(steps, np.float64) / float(target_step)
  g = np.asarray(gammas, np.float64)
  gr = float(target_gamma)
  a = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
  b = _profile_dot(t, g, np.float64(1.0), np.float64(gr))
  try:
    x = np.linalg.solve(a, b)
  except np.linalg.LinAlgError:
    raise ValueError(
      "The stored profiles are linearly dependent (the same step and sigma_rel "
      "stored twice?): pass each snapshot once."
    ) from None
  total = float(np.sum(x))
  if not math.isfinite(total) or total == 0.0:
    raise ValueError(
      f"The least-squares coefficients sum to {total}; cannot normalise."
    )
  coefficients = x / total
  target_norm2 = (gr + 1.0) ** 2 / (2.0 * gr + 1.0)
  residual2 = target_norm2 - 2.0 * coefficients @ b + coefficients @ a @ coefficients
  return coefficients, math.sqrt(max(float(residual2), 0.0) / target_norm2)


def rows(
  snaps: Sequence[_snapshots.Snapshot], step: int
) -> list[tuple[_snapshots.Snapshot, int]]:
  """The stored profiles used for a target at ``step``: (snapshot, index)."""
  return [(s, j) for s in snaps if 0 < s.step <= step for j in range(len(s.keys))]


def select_weights(
  snaps: Sequence[_snapshots.Snapshot], sigma_rel: Any, step: Any
) -> ReconstructionWeights:
  """:class:`ReconstructionWeights` for loaded snapshots (checks the inputs)."""
  sigma_rel = _validation.check_sigma_rel(sigma_rel)
  step = _validation.check_step(step, [s.step for s in snaps], _snapshots.list_steps)
  used = rows(snaps, step)
  tracked = sorted({float(s.sigma_rels[j]) for s, j in used})
  if len(tracked) < 2:
    raise ValueError(
      "Post-hoc reconstruction needs snapshots of at least two profiles "
      f"(sigma_rel values) up to step {step}, got only {tracked}: train with "
      "e.g. `power_ema(opt, sigma_rels=(0.05, 0.10))`."
    )
  steps = np.array([s.step for s, _ in used], np.int64)
  sigmas = np.array([s.sigma_rels[j] for s, j in used], np.float64)
  gammas = np.array([s.gammas[j] for s, j in used], np.float64)
  target_gamma = _power_math.sigma_rel_to_gamma(sigma_rel)
  coefficients, fit_error = solve_weights(steps, gammas, step, target_gamma)
  weights = ReconstructionWeights(
    step, sigma_rel, steps, sigmas, coefficients, fit_error
  )
  warn_if_poorly_fit(weights, tracked)
  return weights


def warn_if_poorly_fit(
  weights: ReconstructionWeights, tracked: Sequence[float]
) -> None:
  """The one place that warns when ``weights.fit_error > FIT_ERROR_WARNING``.

  Callers that report the fit error themselves (a sweep) suppress it with
  ``warnings.catch_warnings()``. The warning points at the user's call of
  :func:`reconstruct` / :func:`reconstruction_weights` (or whatever led
  there).
  """
  if not weights.fit_error > FIT_ERROR_WARNING:
    return
  widths = ", ".join(f"{s:g}" for s in tracked)
  _warn.warn(
    f"posthoc: the target sigma_rel={weights.sigma_rel:g} at step "
    f"{weights.step} is fit with a relative L2 error (fit_error) of "
    f"{weights.fit_error:.2f} (above {FIT_ERROR_WARNING:g}): the stored "
    f"profiles (sigma_rels {widths}) cannot express it well, and its average "
    "is an extrapolation. Track a width nearer to it "
    "(`power_ema(sigma_rels=...)`), or save snapshots more often."
  )


def reconstruction_weights(
  directory_or_snapshots: str
  | os.PathLike[str]
  | Iterable[str | os.PathLike[str] | _snapshots.Snapshot],
  sigma_rel: float,
  step: int | None = None,
) -> ReconstructionWeights:
  """The coefficients :func:`reconstruct` gives each stored profile.

  Uses every profile of every snapshot taken at or before ``step`` (and after
  step 0), as the released EDM2 code does.

  Args:
    directory_or_snapshots: as for :func:`load_snapshots`.
    sigma_rel: the target width, in ``(0, 0.30028]``.
    step: the step the target average ends at, one of the snapshot steps
      (default: the last one).

  Returns:
    A :class:`ReconstructionWeights`.

  Warns:
    UserWarning: the stored profiles fit the target's with a relative L2
      error above 0.1 (``fit_error``; a width far outside the tracked ones,
      or too few snapshots): the result is an extrapolation. Never for a
      tracked width at a snapshot step (fit exactly).

  Raises:
    ValueError: no snapshots; fewer than two distinct tracked ``sigma_rel``
      up to ``step``; ``sigma_rel`` outside the solvable range; ``step`` not a
      snapshot step (the message lists them).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from optax_ema import posthoc
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax_ema.power_ema(optax.sgd(1.0), sigma_rels=(0.05, 0.10))
    >>> state = tx.init(params)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   with posthoc.SnapshotWriter(d) as writer:
    ...     for step in range(1, 41):
    ...       updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
    ...       params = optax.apply_updates(params, updates)
    ...       if step % 20 == 0:
    ...         _ = writer.save(state)
    ...   w = posthoc.reconstruction_weights(d, sigma_rel=0.07)
    >>> print(w.step, w.snapshot_steps, w.snapshot_sigma_rels)
    40 [20 20 40 40] [0.05 0.1  0.05 0.1 ]
    >>> total = sum(w.coefficients)
    >>> print([f"{c:.3f}" for c in w.coefficients], f"{total:.3f}")
    ['0.000', '-0.002', '0.439', '0.563'] 1.000
  """
  snaps = _snapshots.load_snapshots(directory_or_snapshots)
  return select_weights(snaps, sigma_rel, step)
