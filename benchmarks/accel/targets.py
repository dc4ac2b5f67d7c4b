"""Named compile targets: deviceless TPU slices, NVIDIA GPUs, and the CPU.

A target is resolved into devices only when it is compiled for, through
``jax.experimental.topologies``: TPU topologies come from libtpu (``jax[tpu]``),
GPUs from the CUDA plugin (``jax[cuda12]``) with a TargetConfig text committed
under ``data/``. The ``cpu`` targets use the process's own (fake) CPU devices,
so that the harness runs where neither is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import pathlib
from typing import Any

import numpy as np

DATA = pathlib.Path(__file__).resolve().parent / "data"


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target.

  Attributes:
    name: the name used on the command line and in the results.
    platform: ``"tpu"``, ``"cuda"`` or ``"cpu"``.
    topology: the TPU topology name (``"v5e:16x16"``), the GPU topology
      (``"1x1x8"``: one host, eight GPUs) or the number of CPU devices.
    num_slices: TPU slices joined over the data-center network (the mesh
      gets a ``"slice"`` axis first).
    spec: the GPU TargetConfig file under ``data/``.
    tensor: the size of the tensor-parallel axis of the FSDP+TP mesh.
  """

  name: str
  platform: str
  topology: str
  num_slices: int = 1
  spec: str = ""
  tensor: int = 4

  @property
  def num_devices(self) -> int:
    return len(devices(self))


TARGETS: dict[str, Target] = {
  t.name: t
  for t in (
    Target("v5e-4", "tpu", "v5e:2x2"),
    Target("v5e-16", "tpu", "v5e:4x4"),
    Target("v5e-64", "tpu", "v5e:8x8"),
    Target("v5e-256", "tpu", "v5e:16x16"),
    Target("v5p-128", "tpu", "v5p:4x4x4"),
    Target("v6e-256", "tpu", "v6e:16x16"),
    Target("v5e-256x2", "tpu", "v5e:16x16", num_slices=2),
    Target("h100x2", "cuda", "1x1x2", spec="h100_sxm.txtpb", tensor=2),
    Target("h100x8", "cuda", "1x1x8", spec="h100_sxm.txtpb"),
    Target("h200x8", "cuda", "1x1x8", spec="h200_sxm.txtpb"),
    Target("cpu8", "cpu", "8"),
    Target("cpu2", "cpu", "2", tensor=2),
  )
}


@functools.cache
def _topology(target: Target) -> Any:
  from jax.experimental import topologies

  if target.platform == "tpu":
    return topologies.get_topology_desc(
      topology_name=target.topology, platform="tpu", num_slices=target.num_slices
    )
  config = (DATA / target.spec).read_text()
  return topologies.get_topology_desc(
    target.name, "cuda", target_config=config, topology=target.topology
  )


def devices(target: Target) -> list[Any]:
  """The target's devices, in the order the mesh lays them out."""
  import jax

  if target.platform == "cpu":
    n = int(target.topology)
    found = jax.devices("cpu")
    if len(found) < n:
      raise ValueError(
        f"target {target.name!r} needs {n} CPU devices, found {len(found)}: "
        "set XLA_FLAGS=--xla_force_host_platform_device_count=8 (or "
        "jax.config.update('jax_num_cpu_devices', 8)) before jax starts."
      )
    return found[:n]
  return list(_topology(target).devices)


def mesh(target: Target, tensor_parallel: bool) -> Any:
  """A mesh over the target: axes ``("slice",)? + ("fsdp",) + ("tensor",)?``.

  Multi-slice targets put the slices on a leading ``"slice"`` axis (data
  parallel over the data-center network), each slice's chips on the others.
  """
  from jax.sharding import Mesh

  devs = devices(target)
  slices = target.num_slices
  if slices > 1:
    devs = sorted(devs, key=lambda d: (d.slice_index, d.id))
  per_slice = len(devs) // slices
  shape: tuple[int, ...] = (per_slice,)
  names: tuple[str, ...] = ("fsdp",)
  if tensor_parallel:
    shape, names = (per_slice // target.tensor, target.tensor), ("fsdp", "tensor")
  if slices > 1:
    shape, names = (slices, *shape), ("slice", *names)
  return Mesh(np.array(devs, dtype=object).reshape(shape), names)


def versions() -> dict[str, Any]:
  """Package versions and the XLA flags in force: every result file holds them."""
  out: dict[str, Any] = {}
  for package in (
    "jax",
    "jaxlib",
    "libtpu",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "optax",
  ):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = None
  for flag in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_PLATFORMS"):
    out[flag] = os.environ.get(flag, "")
  return out
