"""The public averaging wrappers: optimizers by name and Keras keyword arguments.

The transforms of the core take an optax transformation. The functions
exported as ``optax_ema.moving_average``, ``optax_ema.power_ema`` and
``optax_ema.swa`` are the same transforms behind a thin edge that also
takes the name of an optax optimizer (``"adam"``) and Keras's optimizer
keyword arguments (``learning_rate``, ``lr``, ``decay``, ``clipnorm``,
``clipvalue``, ``global_clipnorm``, the alias's own arguments), as TFA's
classes did, and resolves them before calling the core.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any
from typing import TypeVar

from optax_ema import _moving_average
from optax_ema import _power_ema
from optax_ema import _swa
from optax_ema.compat import _optimizers

_T = TypeVar("_T")

# How the core's docstrings describe `optimizer`; the edge's replace it.
_CORE_OPTIMIZER_DOC = "    optimizer: the optax transformation to wrap.\n"


def _document(doc: str | None, optimizer_doc: str) -> str:
  """The core's docstring ``doc`` with the edge's ``optimizer`` entry."""
  if doc is None or doc.count(_CORE_OPTIMIZER_DOC) != 1:
    raise ValueError(f"the core's docstring has no one line {_CORE_OPTIMIZER_DOC!r}")
  return doc.replace(_CORE_OPTIMIZER_DOC, optimizer_doc)


def with_optimizer_names(
  core: Callable[..., _T], optimizer_doc: str
) -> Callable[..., _T]:
  """``core`` taking an optimizer by name and Keras's optimizer keywords too.

  Keyword arguments that ``core`` does not take are the optimizer's: they
  build it from its name, or are Keras's clip arguments; anything else is a
  TypeError naming it.

  Args:
    core: a factory of the core, taking a transformation as ``optimizer``.
    optimizer_doc: the ``optimizer`` entry of the edge's docstring, which
      replaces the core's (which speaks of transformations only).

  Returns:
    The edge: ``core``'s signature with a ``**optimizer_kwargs`` catch-all,
    and its docstring with ``optimizer_doc``.
  """
  signature = inspect.signature(core)
  own = set(signature.parameters) - {"optimizer"}
  caller = core.__name__

  @functools.wraps(core)
  def edge(optimizer: Any, *args: Any, **kwargs: Any) -> _T:
    optimizer_kwargs = {k: v for k, v in kwargs.items() if k not in own}
    core_kwargs = {k: v for k, v in kwargs.items() if k in own}
    optimizer = _optimizers.resolve_optimizer(optimizer, optimizer_kwargs, caller)
    return core(optimizer, *args, **core_kwargs)

  catch_all = inspect.Parameter(
    "optimizer_kwargs", inspect.Parameter.VAR_KEYWORD, annotation="Any"
  )
  edge.__signature__ = signature.replace(  # type: ignore[attr-defined]
    parameters=[*signature.parameters.values(), catch_all]
  )
  edge.__doc__ = _document(core.__doc__, optimizer_doc)
  return edge


moving_average = with_optimizer_names(
  _moving_average.moving_average,
  """    optimizer: the optax transformation to wrap, or the name of an optax
      optimizer (``"sgd"``, ``"adam"``, ...), built with
      ``optax.inject_hyperparams`` so that its learning rate lives in the
      state (Keras's default learning rate when none is given).
""",
)
power_ema = with_optimizer_names(
  _power_ema.power_ema,
  """    optimizer: the optax transformation to wrap, or the name of an optax
      optimizer, as for :func:`optax_ema.moving_average`.
""",
)
swa = with_optimizer_names(
  _swa.swa,
  """    optimizer: the optax transformation to wrap, or the name of an optax
      optimizer (``"sgd"``, ``"adam"``, ...; see
      :func:`optax_ema.moving_average`).
""",
)
