"""Host offload: averages kept in the host memory of their parameters' devices.

With ``offload=True`` every floating-point average leaf lives in the
``pinned_host`` memory kind, sharded like its parameter; an averaging step
brings each leaf to device memory, moves it and puts it back, inside the
conditional that steps which do not average skip. ``jax.device_put`` with a
memory :class:`jax.memory.Space` keeps the sharding and works eagerly and
under ``jit`` (with donation), ``vmap`` and ``shard_map``. Under ``pmap``
the host placement would be dropped at its outputs: refused.
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


def check_not_in_pmap() -> None:
  """Refuses ``offload=True`` inside ``jax.pmap``.

  ``jax.pmap`` runs its function as a ``shard_map`` without replication
  checks inside a ``jit`` whose outputs go to device memory: the averages
  would silently stay there, and a state already in host memory fails inside
  JAX with a memory-kind mismatch. ``shard_map`` (with its default
  ``check_vma=True``) and ``vmap`` keep the placement.
  """
  manual = jax.sharding.get_abstract_mesh().manual_axes
  if manual and not getattr(jax.config, "check_vma", True):
    raise ValueError(
      "`offload=True` does not work inside jax.pmap (or a jax.shard_map with "
      "`check_vma=False`): pmap puts its outputs in device memory, so the "
      "averages would not stay in host memory. Drop `offload` under pmap, or "
      "train with jax.jit over sharded params (or jax.shard_map) and pass "
      "`optax_ema.state_shardings(tx, params)` as the state's shardings."
    )
