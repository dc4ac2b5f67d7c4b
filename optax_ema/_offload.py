"""Host offload: averages kept in the host memory of their parameters' devices.

With ``offload=True`` every floating-point average leaf lives in the
``pinned_host`` memory kind, sharded like its parameter; an averaging step
brings each leaf to device memory, moves it and puts it back, inside the
conditional that steps which do not average skip. ``jax.device_put`` with a
memory :class:`jax.memory.Space` keeps the sharding and works eagerly and
under ``jit`` (with donation).
"""

from __future__ import annotations

from typing import Any

import jax

from optax_ema import _tree_utils


def to_host(x: Any) -> Any:
  """``x`` in the host memory of its devices, sharded as it is."""
  return jax.device_put(x, jax.memory.Space.Host)


def to_device(x: Any) -> Any:
  """``x`` in the device memory of its devices, sharded as it is."""
  return jax.device_put(x, jax.memory.Space.Device)


def on_host(x: Any) -> bool:
  """Whether the array (or tracer) ``x`` lives in host memory."""
  if _tree_utils.is_none_or_masked(x) or not hasattr(x, "dtype"):
    return False
  return getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host


def to_device_if_host(x: Any) -> Any:
  return to_device(x) if on_host(x) else x
