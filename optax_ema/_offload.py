"""Host offload: averages kept in the host memory of their parameters' devices.

With ``offload=True`` every floating-point average leaf lives in the
``pinned_host`` memory kind, sharded like its parameter, and an averaging
step moves it inside the gate that steps which do not average skip. Where it
is moved depends on the compiler (chosen per lowering platform, as the gate
is, see :func:`step_offloaded`):

- XLA:TPU schedules every host-to-device copy of a step as early as it can,
  so bringing the averages over would hold all of them in device memory at
  once (1.05-2.41x the parameter bytes of temporaries on v6e, v5e and v5p
  slices, measured). There each
  leaf is moved by the host's CPU instead (XLA host compute): the leaf's new
  params go over to host memory, one leaf after the other, and the device
  holds no average and no copy at all; host memory holds one leaf's params
  in transit beside the averages.
- Elsewhere (GPU, CPU) each leaf is brought to device memory, moved and put
  back, one leaf after the other: a leaf comes over only once the leaf
  before it has left, so the device holds one average at a time (on 8
  H100s, 0.18x the parameter bytes of temporaries, the largest leaf, where
  letting XLA:GPU schedule the copies freely held 0.37-0.77x).

``jax.device_put`` with a memory :class:`jax.memory.Space` keeps the
sharding and works eagerly and under ``jit`` (with donation), ``vmap`` and
``shard_map``. Under ``pmap`` the host placement would be dropped at its
outputs: refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental.compute_on import compute_on

from optax_ema import _tree_utils

# "host" or "device" forces where offloaded averages are moved, on every
# platform (tests and benchmarks that compare the two set it); None chooses
# per lowering platform: on the host on TPU, in device memory elsewhere.
FORCE: str | None = None


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


def tree_to_device(tree: Any) -> Any:
  """``tree`` with its leaves in host memory brought to device memory."""

  def leaf(x: Any) -> Any:
    return to_device(x) if on_host(x) else x

  return jax.tree.map(leaf, tree, is_leaf=_tree_utils.is_none_or_masked)


@functools.cache
def _on_host_cpu(step: Callable[..., Any]) -> Callable[..., Any]:
  """``step`` compiled for the host's CPU (``stochastic`` static).

  Inside a host computation every buffer is host memory; its arguments are
  given the default memory space there so that the arrays ``step`` makes
  itself (zeros, random bits) agree with them.
  """

  def on_cpu(average: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    return to_host(step(to_device(average), to_device(value), *args, **kwargs))

  return compute_on("device_host")(jax.jit(on_cpu, static_argnames=("stochastic",)))


def step_offloaded(
  step: Callable[..., Any],
  average: Any,
  value: Any,
  after: Any,
  *args: Any,
  **kwargs: Any,
) -> Any:
  """``step(average, value, *args, **kwargs)`` for a leaf in host memory.

  Returns the new leaf, in host memory. ``after`` (``None``, or the previous
  offloaded leaf's result) orders the steps: a leaf's params go over to the
  host (TPU), or its average comes to the device (elsewhere), only once the
  leaf before it is done, so that one leaf is in transit, not the model.
  ``step`` must be a module-level function (it is compiled once per
  function); ``kwargs`` may hold ``stochastic``, static.
  """

  def on_device(a: Any, v: Any, after: Any, *args: Any) -> Any:
    if after is not None:  # this average comes over after the last one left
      a, _ = jax.lax.optimization_barrier((a, after))
    return to_host(step(to_device(a), v, *args, **kwargs))

  def on_host(a: Any, v: Any, after: Any, *args: Any) -> Any:
    if after is not None:  # this leaf's params go over after the last one
      v, _ = jax.lax.optimization_barrier((v, after))
    # The copy to host done before the host starts: else XLA:TPU lets the
    # host read the params from device memory, through a relayout there.
    v = jax.lax.optimization_barrier(to_host(v))
    return to_host(_on_host_cpu(step)(a, v, *args, **kwargs))

  if FORCE == "host":
    return on_host(average, value, after, *args)
  if FORCE == "device":
    return on_device(average, value, after, *args)
  return jax.lax.platform_dependent(
    average, value, after, *args, tpu=on_host, default=on_device
  )


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
