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

_PASS_THROUGH = (
  optax.InjectHyperparamsState,
  optax.InjectStatefulHyperparamsState,
)


def _children(old: Any, new: Any) -> list[tuple[Any, Any]]:
  """The sub-states of a pass-through wrapper's state (a chain, a dict...)."""
  if isinstance(old, _PASS_THROUGH):
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


def check_not_an_update_average(inner_state: Any, caller: str) -> None:
  """Rejects ``optax.ema`` given as the optimizer to wrap.

  ``optax.ema`` averages the *updates* (a momentum) and returns them as the
  step: wrapped alone, or last in a chain (nothing after it to scale the
  step by a negative learning rate), training would move along the averaged
  gradients, up the loss.
  """
  state = inner_state
  # The transformation's own state, or the last of a chain's (what the
  # optimizer's updates finally are), through pass-through wrappers.
  while isinstance(state, _PASS_THROUGH) or (type(state) is tuple and state):
    state = state.inner_state if isinstance(state, _PASS_THROUGH) else state[-1]
  if isinstance(state, optax.EmaState):
    raise ValueError(
      "`optimizer` is (or ends with) optax.ema, which averages the updates "
      "(a momentum of the gradients) and returns them as the step: training "
      "would climb the "
      f"loss. {caller} keeps the average of the parameters itself; wrap the "
      f"optimizer you train with, e.g. `optax_ema.{caller}(optax.adam(1e-3)"
      f"{', average_decay=0.999' if caller == 'moving_average' else ''})`."
    )


_PARTIAL = (optax.MaskedState, optax.MultiTransformState)


def _is_gate(x: Any) -> bool:
  return isinstance(x, (optax.MultiStepsState, *_PARTIAL))


def check_no_partial_multisteps(inner_state: Any, caller: str) -> None:
  """Rejects ``optax.MultiSteps`` under ``optax.masked`` / ``multi_transform``.

  There it applies an update to some leaves only, on its own schedule, while
  the other leaves are updated at every micro-step: the average's one scalar
  count cannot hold per-leaf real steps, and would average micro-steps.
  """

  def visit(state: Any, inside: str | None) -> None:
    for node in jax.tree.leaves(state, is_leaf=_is_gate):
      if isinstance(node, optax.MultiStepsState) and inside is not None:
        raise ValueError(
          f"`optimizer` holds optax.MultiSteps inside {inside}: it accumulates "
          "micro-steps for some parameters only, while the others take an update "
          f"at every micro-step, and {caller}'s one count of real steps cannot "
          "follow both. Put optax.MultiSteps around the whole optimizer "
          f"instead, e.g. `optax.MultiSteps(optax_ema.{caller}(optax.masked("
          "adam, mask)), every_k_schedule=k)`, or "
          f"`optax_ema.{caller}(optax.MultiSteps(optax.masked(adam, mask), k))`."
        )
      if isinstance(node, optax.MultiStepsState):
        visit(node.inner_opt_state, inside)
      elif isinstance(node, optax.MaskedState):
        visit(node.inner_state, inside or "optax.masked")
      elif isinstance(node, optax.MultiTransformState):
        visit(node.inner_states, "optax.multi_transform")

  visit(inner_state, None)
