"""``orbax.checkpoint``, imported on first use.

Orbax is an optional dependency of optax_ema (the ``orbax`` extra): the
package imports without it, and the first post-hoc call that needs it raises
an ImportError that says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_INSTALL = (
  "optax_ema.posthoc stores snapshots as Orbax checkpoints and needs "
  "orbax-checkpoint: `pip install 'optax-ema[orbax]'`."
)


def load() -> ModuleType:
  """The ``orbax.checkpoint`` module; ImportError naming the install."""
  try:
    return importlib.import_module("orbax.checkpoint")
  except ImportError as err:
    raise ImportError(_INSTALL) from err


class _LazyOrbax:
  """Forwards attribute access to ``orbax.checkpoint``, imported on first use."""

  def __getattr__(self, name: str) -> Any:
    return getattr(load(), name)


ocp: Any = _LazyOrbax()
