"""What the post-hoc modules take from the rest of optax_ema, in one place.

Every name the snapshot, solver and reconstruction modules need from the
package internals is imported (or defined from them) here, so that a change
of those internals touches this file only. The sigma_rel math comes from
``optax_ema._power_math`` directly.
"""

from __future__ import annotations

from typing import Any

from optax_ema._reading import find_average_state
from optax_ema._reading import find_average_states
from optax_ema._states import PowerEmaLayout
from optax_ema._states import PowerEmaState
from optax_ema._tree_utils import is_key
from optax_ema._tree_utils import is_none
from optax_ema._tree_utils import is_none_or_masked
from optax_ema._tree_utils import keystr

__all__ = [
  "PowerEmaLayout",
  "PowerEmaState",
  "find_power_state",
  "is_key",
  "is_none",
  "is_none_or_masked",
  "keystr",
]


# How each caller is called with one state of several, for the message.
_CALLS = {
  "save_snapshot": "posthoc.save_snapshot(directory, {state})",
  "SnapshotWriter.save": "writer.save({state})",
  "snapshot_items": "posthoc.snapshot_items({state}, run)",
  "SnapshotRun": "SnapshotRun(directory, resume_from={state})",
}


def find_power_state(opt_state: Any, caller: str) -> PowerEmaState:
  """The single :class:`PowerEmaState` anywhere inside ``opt_state``.

  Found by type, as :func:`optax_ema.averaged_params` finds any averaging
  state (inside ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``
  states or any pytree holding one).

  Args:
    opt_state: an optimizer state, or any pytree holding one.
    caller: the public function asking, named in error messages.

  Returns:
    The power-EMA state.

  Raises:
    ValueError: there is no averaging state, more than one, or it is not
      the state of ``power_ema``.
  """
  found = find_average_states(opt_state)
  if len(found) > 1:
    where = ", ".join(f"{type(s).__name__} at opt_state{keystr(p)}" for p, s in found)
    first = f"opt_state{keystr(found[0][0])}"
    call = _CALLS.get(caller, caller + "({state})").format(state=first)
    raise ValueError(
      f"`{caller}` found {len(found)} averaging states in `opt_state`: {where}; "
      f"a snapshot holds one power_ema state: pass it, e.g. `{call}`."
    )
  state = find_average_state(opt_state, caller)
  if not isinstance(state, PowerEmaState):
    raise ValueError(
      f"`{caller}` needs the state of optax_ema.power_ema, found a "
      f"{type(state).__name__}: wrap the optimizer with "
      "`optax_ema.power_ema(optimizer, sigma_rels=(0.05, 0.10))`."
    )
  return state
