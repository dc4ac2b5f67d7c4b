"""Checks of the optimizer an averaging transform wraps.

The optimizer is checked twice: its type when the transform is built
(:func:`check_transformation`), and the state its ``init`` builds, which is
the first moment what it is made of can be seen (:func:`checked_optimizer`
returns it with an ``init`` that checks that state). The messages speak of
transformations only: the edge that also takes optimizers by name
(:mod:`optax_ema.compat`) adds its own words through ``also``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_ema import _inner_state


def check_transformation(optimizer: Any, also: str = "") -> None:
  """An object with callable ``init`` and ``update``.

  Args:
    optimizer: the ``optimizer`` argument.
    also: what else the caller accepts, in words, after "an
      optax.GradientTransformation (...)" (e.g. " or the name of an optax
      optimizer such as 'adam'").
  """
  if not (
    callable(getattr(optimizer, "init", None))
    and callable(getattr(optimizer, "update", None))
  ):
    raise TypeError(
      "`optimizer` must be an optax.GradientTransformation (an object with "
      f"`init` and `update`){also}, got {type(optimizer).__name__}: "
      f"{optimizer!r}."
    )


def _check_not_an_update_average(inner_state: Any, caller: str, example: str) -> None:
  """Rejects ``optax.ema`` given as the optimizer to wrap.

  ``optax.ema`` averages the *updates* (a momentum) and returns them as the
  step: wrapped alone, or last in a chain (nothing after it to scale the
  step by a negative learning rate), training would move along the averaged
  gradients, up the loss.
  """
  state = inner_state
  # The transformation's own state, or the last of a chain's (what the
  # optimizer's updates finally are), through pass-through wrappers.
  pass_through = _inner_state.PASS_THROUGH
  while isinstance(state, pass_through) or (type(state) is tuple and state):
    state = state.inner_state if isinstance(state, pass_through) else state[-1]
  if isinstance(state, optax.EmaState):
    raise ValueError(
      "`optimizer` is (or ends with) optax.ema, which averages the updates "
      "(a momentum of the gradients) and returns them as the step: training "
      "would climb the "
      f"loss. {caller} keeps the average of the parameters itself; wrap the "
      f"optimizer you train with, e.g. `{example}`."
    )


_PARTIAL = (optax.MaskedState, optax.MultiTransformState)


def _is_gate(x: Any) -> bool:
  return isinstance(x, (optax.MultiStepsState, *_PARTIAL))


def _check_no_partial_multisteps(inner_state: Any, caller: str) -> None:
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


def checked_optimizer(
  optimizer: Any, caller: str, example: str
) -> optax.GradientTransformationExtraArgs:
  """``optimizer``, checked now and again when its ``init`` builds its state.

  Args:
    optimizer: the transformation to wrap.
    caller: the factory's name, for messages.
    example: a call of the factory that wraps an optimizer as it should be,
      shown when ``optimizer`` is ``optax.ema``.

  Returns:
    ``optimizer`` with extra-args support, whose ``init`` refuses a state
    that ends with ``optax.ema``'s or holds ``optax.MultiSteps`` inside
    ``optax.masked`` or ``optax.multi_transform``; its ``update`` is the
    optimizer's own.
  """
  check_transformation(optimizer)
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> Any:
    inner_state = inner.init(params)
    _check_not_an_update_average(inner_state, caller, example)
    _check_no_partial_multisteps(inner_state, caller)
    return inner_state

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)
