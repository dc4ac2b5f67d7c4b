"""Turning the `optimizer` argument into an optax transformation.

Placeholder until optimizers by name and Keras keyword arguments land: only
transformations are accepted, and any extra keyword argument is an error.
"""

from __future__ import annotations

from typing import Any

import optax


def resolve_optimizer(
  optimizer: Any, kwargs: dict[str, Any], caller: str
) -> optax.GradientTransformation:
  """Returns ``optimizer`` as a transformation, or raises a clear TypeError."""
  if kwargs:
    raise TypeError(
      f"`{caller}` got unexpected keyword argument(s): {', '.join(sorted(kwargs))}."
    )
  if isinstance(optimizer, str):
    raise TypeError(
      f"`optimizer` must be an optax.GradientTransformation, got the string "
      f"{optimizer!r}; build it first, e.g. optax.{optimizer}(learning_rate)."
    )
  if not (
    callable(getattr(optimizer, "init", None))
    and callable(getattr(optimizer, "update", None))
  ):
    raise TypeError(
      "`optimizer` must be an optax.GradientTransformation (an object with "
      f"`init` and `update`), got {type(optimizer).__name__}: {optimizer!r}."
    )
  return optimizer
