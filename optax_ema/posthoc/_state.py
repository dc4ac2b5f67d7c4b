"""What the post-hoc modules take from the rest of optax_ema, in one place.

Every name the snapshot, solver and reconstruction modules need from the
package internals is imported (or defined from them) here, so that a change
of those internals touches this file only. The sigma_rel math comes from
``optax_ema._power_math`` directly.
"""

from __future__ import annotations

from typing import Any

import jax

from optax_ema._power import PowerEmaState
from optax_ema._tree_utils import is_key
from optax_ema._tree_utils import is_none
from optax_ema._tree_utils import is_none_or_masked
from optax_ema._tree_utils import keystr

__all__ = [
  "PowerEmaState",
  "find_power_state",
  "is_key",
  "is_none",
  "is_none_or_masked",
  "keystr",
]


def _is_power_state(x: Any) -> bool:
  return isinstance(x, PowerEmaState)


def find_power_state(opt_state: Any, caller: str) -> PowerEmaState:
  """The single :class:`PowerEmaState` anywhere inside ``opt_state``.

  Searches by type (inside ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps`` states or any pytree holding one), never by attribute.

  Args:
    opt_state: an optimizer state, or any pytree holding one.
    caller: the public function asking, named in error messages.

  Returns:
    The power-EMA state.

  Raises:
    ValueError: there is none, or more than one.
  """
  if _is_power_state(opt_state):
    return opt_state
  flat, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_power_state)
  found = [(path, x) for path, x in flat if _is_power_state(x)]
  if not found:
    raise ValueError(
      f"`{caller}` needs the state of optax_ema.power_ema, found none in "
      f"`opt_state` (a {type(opt_state).__name__}): wrap the optimizer with "
      "`optax_ema.power_ema(optimizer, sigma_rels=(0.05, 0.10))`."
    )
  if len(found) > 1:
    where = ", ".join(f"opt_state{keystr(path)}" for path, _ in found)
    raise ValueError(
      f"`{caller}` found {len(found)} power_ema states in `opt_state` ({where}): "
      "pass the one to snapshot."
    )
  return found[0][1]
