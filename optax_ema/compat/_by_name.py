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


def with_optimizer_names(core: Callable[..., _T]) -> Callable[..., _T]:
  """``core`` taking an optimizer by name and Keras's optimizer keywords too.

  Keyword arguments that ``core`` does not take are the optimizer's: they
  build it from its name, or are Keras's clip arguments; anything else is a
  TypeError naming it.
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
  return edge


moving_average = with_optimizer_names(_moving_average.moving_average)
power_ema = with_optimizer_names(_power_ema.power_ema)
swa = with_optimizer_names(_swa.swa)
