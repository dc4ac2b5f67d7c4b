"""What the wrapped optimizer's state tells the wrapper.

An average must move exactly on the steps where the wrapped optimizer
applies an update. ``optax.MultiSteps`` returns zero updates on its
micro-steps and ``optax.apply_if_finite`` on the steps it rejects; both say
so in their states, which are found here by type, through the wrappers that
only pass updates on (``optax.chain``, ``optax.named_chain``,
``optax.inject_hyperparams``).
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import optax

# The wrappers that only pass updates on: their states are looked through.
PASS_THROUGH = (
  optax.InjectHyperparamsState,
  optax.InjectStatefulHyperparamsState,
)


def _children(old: Any, new: Any) -> list[tuple[Any, Any]]:
  """The sub-states of a pass-through wrapper's state (a chain, a dict...)."""
  if isinstance(old, PASS_THROUGH):
    return [(old.inner_state, new.inner_state)]
  if type(old) in (tuple, list):  # optax.chain; not NamedTuple states
    return list(zip(old, new, strict=True))
  if type(old) in (dict, collections.OrderedDict):  # optax.named_chain
    return [(old[k], new[k]) for k in old]
  return []


def applied_update(old: Any, new: Any) -> jax.Array | None:
  """Whether the step from inner state ``old`` to ``new`` applied an update.

  ``None`` when nothing in the state gates the updates (every step
  applies one). With ``optax.MultiSteps``, the steps on which its
  ``gradient_step`` advanced (so a ``should_skip_update_fn`` skip counts as
  no update); with ``optax.apply_if_finite``, the steps whose updates were
  finite (after ``max_consecutive_errors`` it applies a non-finite update,
  which the average does not take). Gates nested in one another combine.
  """
  flags: list[jax.Array] = []

  def visit(o: Any, n: Any) -> None:
    if isinstance(o, optax.MultiStepsState):
      flags.append(jnp.asarray(n.gradient_step) != jnp.asarray(o.gradient_step))
      visit(o.inner_opt_state, n.inner_opt_state)
    elif isinstance(o, optax.ApplyIfFiniteState):
      flags.append(jnp.asarray(n.last_finite, jnp.bool_))
      visit(o.inner_state, n.inner_state)
    else:
      for child_old, child_new in _children(o, n):
        visit(child_old, child_new)

  visit(old, new)
  if not flags:
    return None
  out = flags[0]
  for flag in flags[1:]:
    out = out & flag
  return out
