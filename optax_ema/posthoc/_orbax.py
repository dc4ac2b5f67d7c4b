"""``orbax.checkpoint``, imported on first use.

Orbax is an optional dependency of optax_ema (the ``orbax`` extra): the
package imports without it, and the first post-hoc call that needs it raises
an ImportError that says what to install. The post-hoc modules use Orbax APIs
of 0.12 (partial restores, ``ocp.tree`` flat dicts, ``ocp.path.step``), the
version they are tested with; older versions are refused.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from types import ModuleType
from typing import Any

MIN_VERSION = (0, 12)
_INSTALL = (
  "optax_ema.posthoc stores snapshots as Orbax checkpoints and needs "
  "orbax-checkpoint>=0.12: `pip install -U 'orbax-checkpoint>=0.12'`"
)


def _version(text: str) -> tuple[int, ...]:
  parts = []
  for part in text.split(".")[:2]:
    digits = "".join(itertools.takewhile(str.isdigit, part))
    parts.append(int(digits or 0))
  return tuple(parts)


@functools.cache
def load() -> ModuleType:
  """The ``orbax.checkpoint`` module; ImportError naming the install."""
  try:
    module = importlib.import_module("orbax.checkpoint")
  except ImportError as err:
    raise ImportError(f"{_INSTALL}.") from err
  found = getattr(module, "__version__", "0")
  if _version(found) < MIN_VERSION:
    raise ImportError(f"{_INSTALL} (found {found}).")
  return module


class _LazyOrbax:
  """Forwards attribute access to ``orbax.checkpoint``, imported on first use."""

  def __getattr__(self, name: str) -> Any:
    return getattr(load(), name)


ocp: Any = _LazyOrbax()
