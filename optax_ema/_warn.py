"""Warnings that point at the user's line, wherever the package raises them.

Every warning of the package goes through :func:`warn`, which attributes it
to the first frame of the call stack outside the packages in
:data:`SKIPPED`: the line of the user's code that called into the package,
whatever lies in between. That is more than the package's own frames: a
warning raised while ``jax.jit`` or ``jax.lax.scan`` traces ``update``,
while ``optax.chain`` or ``optax.inject_hyperparams`` calls ``init`` (the
latter builds the transform there), or while Flax's ``nnx.Optimizer``, an
Equinox or chex wrapper calls it, has their frames between the user's line
and the package; none of them is a line the user wrote. A hand-counted
``stacklevel`` would be right for one path only (and Python 3.11 has no
``warnings.warn(skip_file_prefixes=...)``).

A frame belongs to a package when its file lies in one of the package's
directories (``__path__``, so namespace packages such as ``orbax`` count);
code the user runs from a string (a doctest, ``exec``) lies in none. When
every frame is skipped (the package's own command line), the warning points
at the outermost one.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

# Top-level packages whose frames are never the user's line: this package
# and the libraries that call into it on the user's behalf.
SKIPPED = ("optax_ema", "optax", "jax", "jaxlib", "chex", "flax", "equinox", "orbax")


def _skipped_directories() -> tuple[str, ...]:
  """The directories of the packages of :data:`SKIPPED` imported so far.

  A package that is not imported has no frame on the stack.
  """
  out = []
  for name in SKIPPED:
    module = sys.modules.get(name)
    for path in getattr(module, "__path__", None) or ():
      out.append(os.path.join(path, ""))
  return tuple(out)


def user_frame() -> FrameType:
  """The first frame, from the caller of this function out, not in a skipped package."""
  skipped = _skipped_directories()
  frame = sys._getframe(1)
  while frame.f_back is not None and frame.f_code.co_filename.startswith(skipped):
    frame = frame.f_back
  return frame


def warn(message: str, category: type[Warning] = UserWarning) -> None:
  """``warnings.warn(message, category)``, attributed to :func:`user_frame`.

  Filters, the once-per-location registry and ``pytest.warns`` see it as
  they see ``warnings.warn`` with the matching ``stacklevel``.

  Args:
    message: the warning's text.
    category: the warning's class.
  """
  frame = user_frame()
  module_globals = frame.f_globals
  warnings.warn_explicit(
    message,
    category,
    frame.f_code.co_filename,
    frame.f_lineno,
    module=module_globals.get("__name__", "<string>"),
    registry=module_globals.setdefault("__warningregistry__", {}),
    module_globals=module_globals,
  )
