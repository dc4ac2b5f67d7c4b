"""Keras's configs of the stateful classes: ``get_config`` and ``from_config``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optax_ema import _validation
from optax_ema.compat import _stateful


def _copy_config(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _copy_config(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_copy_config(v) for v in value]
  return value


def _restore_optimizer(
  spec: Any, custom_objects: Mapping[str, Any] | None
) -> tuple[Any, dict[str, Any]]:
  """``(optimizer, optimizer_kwargs)`` from a config's ``"optimizer"`` entry."""
  custom_objects = dict(custom_objects or {})
  if isinstance(spec, Mapping) and ("name" in spec or "class_name" in spec):
    name = spec.get("name", spec.get("class_name"))
    kwargs = dict(spec.get("config") or {})
    if "name" not in spec:
      kwargs.pop("name", None)  # a Keras config carries the optimizer's own name
  elif isinstance(spec, str):
    name, kwargs = spec, {}
  else:
    return spec, {}  # an optimizer object, used as it is
  if name in custom_objects:
    found = custom_objects[name]
    is_transformation = callable(getattr(found, "init", None)) and callable(
      getattr(found, "update", None)
    )
    if is_transformation:
      if kwargs:
        raise ValueError(
          f"`custom_objects[{name!r}]` is an already-built transformation, so "
          f"the config's optimizer arguments {sorted(kwargs)} cannot apply; map "
          "the name to a factory instead."
        )
      return found, {}
    if callable(found):
      return found(**kwargs), {}
    raise TypeError(
      f"`custom_objects[{name!r}]` must be a transformation or a factory, got "
      f"{type(found).__name__}."
    )
  return name, kwargs


class Config(_stateful.Stateful):
  """``get_config`` and ``from_config``."""

  # -- config ----------------------------------------------------------------

  def _averaging_config(self) -> dict[str, Any]:
    raise NotImplementedError

  def get_config(self) -> dict[str, Any]:
    """The constructor arguments, as a new dict (JSON when given by name).

    Holds ``name``, ``optimizer`` (``{"name": ..., "config": {...}}`` for an
    optimizer given by name, else the transformation object itself, which is
    not JSON), the clip arguments that were set, and the averaging arguments
    as given.
    """
    config: dict[str, Any] = {"name": self.name}
    config.update(_copy_config(self._optimizer_config))
    config.update(self._averaging_config())
    return config

  @classmethod
  def from_config(
    cls, config: Mapping[str, Any], custom_objects: Mapping[str, Any] | None = None
  ) -> Any:
    """Builds an equivalent optimizer from :meth:`get_config`'s dict.

    ``config`` is not modified. An optimizer name found in ``custom_objects``
    maps to a transformation (used as it is) or a factory called with the
    optimizer's config; an optimizer stored as an object is used as it is.
    Keras-style ``{"class_name": ..., "config": ...}`` optimizer entries are
    understood.
    """
    _validation.check_config(config)
    kwargs: dict[str, Any] = _copy_config(dict(config))
    optimizer, optimizer_kwargs = _restore_optimizer(
      kwargs.pop("optimizer"), custom_objects
    )
    _validation.check_config_clash(optimizer_kwargs, kwargs)
    make: Any = cls  # MovingAverage or SWA, each with its own arguments
    return make(optimizer, **kwargs, **optimizer_kwargs)
