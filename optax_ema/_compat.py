"""TFA's ``MovingAverage`` and ``SWA`` classes, as stateful conveniences.

Thin classes over :func:`optax_ema.moving_average` and :func:`optax_ema.swa`
with every member of the TensorFlow Addons optimizers, for porting Keras code
member by member and for quick scripts. They work on parameter pytrees (JAX
arrays are immutable: every step returns the new parameters) and keep the
optimizer state inside. For anything else (``jit`` around a whole training
step, ``optax.chain``, Flax ``TrainState``) use the functional ``tx``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ema import _averaged
from optax_ema import _core
from optax_ema import _optimizers
from optax_ema import _swa
from optax_ema import _tree_utils

# Keras slot names -> optax state field names.
_KERAS_SLOT_NAMES = {
  "m": "mu",
  "v": "nu",
  "momentum": "trace",
  "rms": "nu",
  "accumulator": "sum_of_squares",
}


def _is_hyperparams_state(x: Any) -> bool:
  """An ``optax.inject_hyperparams`` state (of any optax version)."""
  return (
    isinstance(x, tuple)
    and "hyperparams" in getattr(x, "_fields", ())
    and isinstance(x.hyperparams, dict)
  )


def _simple_key(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _leaf_paths(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
  return jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=_tree_utils.is_none_or_masked
  )[0]


def _split_grads_and_vars(grads_and_vars: Any) -> tuple[Any, Any, bool]:
  """``(grads, params, as_pairs)`` from either accepted form."""
  if isinstance(grads_and_vars, tuple) and len(grads_and_vars) == 2:
    grads, params = grads_and_vars
    return grads, params, False
  if isinstance(grads_and_vars, (Mapping, str, bytes)) or not hasattr(
    grads_and_vars, "__iter__"
  ):
    raise TypeError(
      "`grads_and_vars` must be a list of (gradient, param) pairs or a "
      f"(grads, params) tuple of pytrees, got {type(grads_and_vars).__name__}."
    )
  pairs = list(grads_and_vars)
  if not pairs:
    raise ValueError("`grads_and_vars` is empty: no gradients provided.")
  for i, pair in enumerate(pairs):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise TypeError(
        "`grads_and_vars` must be a list of (gradient, param) pairs or a "
        f"(grads, params) tuple of pytrees; element {i} is a "
        f"{type(pair).__name__}, not a pair."
      )
  return [g for g, _ in pairs], [p for _, p in pairs], True


def _initial_value(initializer: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  if isinstance(initializer, str):
    if initializer == "zeros":
      return jnp.zeros(shape, dtype)
    if initializer == "ones":
      return jnp.ones(shape, dtype)
    raise ValueError(
      "`initializer` must be 'zeros', 'ones', a number, an array or a callable "
      f"`(shape, dtype) -> array`, got {initializer!r}."
    )
  if callable(initializer):
    value = jnp.asarray(initializer(shape, dtype), dtype)
  elif isinstance(initializer, (int, float)) and not isinstance(initializer, bool):
    value = jnp.full(shape, initializer, dtype)
  else:
    value = jnp.asarray(initializer, dtype)
  if value.shape != tuple(shape):
    raise ValueError(
      f"`initializer` gave an array of shape {value.shape}, expected {tuple(shape)}."
    )
  return value


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


class _AveragedOptimizer:
  """Machinery shared by :class:`MovingAverage` and :class:`SWA`."""

  def __init__(
    self,
    optimizer: Any,
    name: str,
    kwargs: dict[str, Any],
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation],
  ) -> None:
    if not isinstance(name, str):
      raise TypeError(f"`name` must be a str, got {type(name).__name__}: {name!r}.")
    inner, self._optimizer_config = _optimizers.build_optimizer(
      optimizer, kwargs, type(self).__name__, stacklevel=4
    )
    self._by_name = isinstance(optimizer, str)
    self.name = name
    self.tx: optax.GradientTransformationExtraArgs = wrap(inner)
    self._state: Any = None
    self._params: Any = None
    self._pending: dict[str, Any] = {}
    self._extra_weights: dict[str, jax.Array] = {}
    self._slots: dict[tuple[tuple[Any, ...], str], jax.Array] = {}
    self._step_fn = jax.jit(self._step)

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, iterations={self.iterations})"

  # -- state -----------------------------------------------------------------

  def _step(self, state: Any, grads: Any, params: Any) -> tuple[Any, Any, Any]:
    updates, state = self.tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  def _require_built(self, what: str) -> None:
    if self._state is None:
      raise ValueError(
        f"`{what}` needs the optimizer state, which does not exist yet: call "
        "`build(params)` or apply a step first."
      )

  @property
  def opt_state(self) -> Any:
    """The functional optimizer state (``None`` before the first step)."""
    return self._state

  def build(self, var_list: Any) -> None:
    """Creates the optimizer state for the parameters ``var_list``.

    Called by the first step; call it yourself to read or set the weights
    before training. Building again for parameters of the same structure
    does nothing.
    """
    if self._state is not None:
      _tree_utils.check_like(
        self._state.average, var_list, "var_list", "the parameters it was built for"
      )
      return
    self._state = self.tx.init(var_list)
    self._params = var_list
    pending, self._pending = self._pending, {}
    for name, value in pending.items():
      self._set_hyperparam(name, value)

  def _apply(self, grads: Any, params: Any) -> tuple[Any, Any]:
    if self._state is None:
      self.build(params)
    new_params, updates, self._state = self._step_fn(self._state, grads, params)
    self._params = new_params
    return new_params, updates

  @property
  def iterations(self) -> int:
    """The number of steps applied so far."""
    return 0 if self._state is None else int(self._state.count)

  # -- learning rate ---------------------------------------------------------

  def _hyperparams_location(self, name: str) -> tuple[list[Any], Any, int]:
    leaves, treedef = jax.tree_util.tree_flatten(
      self._state, is_leaf=_is_hyperparams_state
    )
    for i, leaf in enumerate(leaves):
      if _is_hyperparams_state(leaf) and name in leaf.hyperparams:
        return leaves, treedef, i
    raise ValueError(
      f"The optimizer state holds no `{name}`: give the optimizer by name "
      "(e.g. 'sgd') or build it with "
      f"optax.inject_hyperparams(optax.sgd)({name}=...)."
    )

  def _set_hyperparam(self, name: str, value: Any) -> None:
    leaves, treedef, i = self._hyperparams_location(name)
    state = leaves[i]
    if name in getattr(state, "hyperparams_states", {}):
      raise ValueError(f"`{name}` is a schedule here, so it cannot be assigned.")
    old = state.hyperparams[name]
    hyperparams = dict(state.hyperparams)
    hyperparams[name] = jnp.asarray(value, dtype=jnp.asarray(old).dtype)
    leaves[i] = state._replace(hyperparams=hyperparams)
    self._state = jax.tree_util.tree_unflatten(treedef, leaves)

  @property
  def learning_rate(self) -> Any:
    """The (base) learning rate, read from and written to the state.

    Assigning a float changes the learning rate of the next step. With
    Keras's ``decay``, this is the rate before decay, as in Keras.
    """
    if self._state is not None:
      leaves, _, i = self._hyperparams_location("learning_rate")
      return leaves[i].hyperparams["learning_rate"]
    if "learning_rate" in self._pending:
      return jnp.asarray(self._pending["learning_rate"], jnp.float32)
    if self._by_name:
      value = self._optimizer_config["optimizer"]["config"]["learning_rate"]
      return value if callable(value) else jnp.asarray(value, jnp.float32)
    raise ValueError(
      "The learning rate of an optimizer given as a transformation is only "
      "known once the state exists: call `build(params)` or apply a step first."
    )

  @learning_rate.setter
  def learning_rate(self, value: Any) -> None:
    if callable(value) or not _optimizers._is_real_number(value):
      raise TypeError(
        "`learning_rate` can only be assigned a float (a schedule must be given "
        f"when the optimizer is built), got {type(value).__name__}: {value!r}."
      )
    _optimizers._check_learning_rate(value)
    if self._state is not None:
      self._set_hyperparam("learning_rate", value)
      return
    if self._by_name and callable(
      self._optimizer_config["optimizer"]["config"]["learning_rate"]
    ):
      raise ValueError("`learning_rate` is a schedule here, so it cannot be assigned.")
    self._pending["learning_rate"] = value

  @property
  def lr(self) -> Any:
    """Keras's alias of :attr:`learning_rate`."""
    return self.learning_rate

  @lr.setter
  def lr(self, value: Any) -> None:
    self.learning_rate = value

  # -- weights ---------------------------------------------------------------

  @property
  def weights(self) -> list[jax.Array]:
    """The state's arrays, in a stable order.

    ``[iterations, *averages, *inner optimizer state, *add_weight arrays,
    *add_slot arrays]``: the step count, then the averages in the order of
    ``jax.tree.leaves(params)``, then the leaves of the wrapped optimizer's
    state (``jax.tree.leaves`` order), then the arrays made by
    :meth:`add_weight` and :meth:`add_slot`, in creation order. Empty
    before the state exists.
    """
    if self._state is None:
      return []
    state = self._state
    return [
      *jax.tree.leaves((state.count, state.average, state.inner_state)),
      *self._extra_weights.values(),
      *self._slots.values(),
    ]

  def variables(self) -> list[jax.Array]:
    """The same list as :attr:`weights`."""
    return self.weights

  def get_weights(self) -> list[np.ndarray]:
    """:attr:`weights` as NumPy arrays."""
    return [np.asarray(w) for w in self.weights]

  def set_weights(self, weights: Any) -> None:
    """Replaces the state's arrays with ``weights`` (the order of :attr:`weights`).

    Raises:
      ValueError: before the state exists, or for a list of another length, or
        an array of another shape or dtype (Python scalars and lists are
        converted).
    """
    self._require_built("set_weights")
    weights = list(weights)
    current = self.weights
    if len(weights) != len(current):
      raise ValueError(
        f"`weights` must hold {len(current)} arrays (iterations, averages, "
        f"optimizer state, extra weights), got {len(weights)}."
      )
    new = []
    for i, (w, ref) in enumerate(zip(weights, current, strict=True)):
      if hasattr(w, "dtype") and jnp.dtype(w.dtype) != ref.dtype:
        raise ValueError(
          f"`weights[{i}]` has dtype {jnp.dtype(w.dtype).name}, expected "
          f"{ref.dtype.name}."
        )
      value = jnp.asarray(w, dtype=ref.dtype)
      if value.shape != ref.shape:
        raise ValueError(
          f"`weights[{i}]` has shape {value.shape}, expected {ref.shape}."
        )
      new.append(value)
    state = self._state
    treedef = jax.tree.structure((state.count, state.average, state.inner_state))
    count, average, inner_state = jax.tree.unflatten(treedef, new[: treedef.num_leaves])
    self._state = type(state)(inner_state=inner_state, average=average, count=count)
    rest = iter(new[treedef.num_leaves :])
    self._extra_weights = {k: next(rest) for k in self._extra_weights}
    self._slots = {k: next(rest) for k in self._slots}

  # -- steps -----------------------------------------------------------------

  def apply_gradients(self, grads_and_vars: Any) -> Any:
    """Applies one step and returns the new parameters.

    Args:
      grads_and_vars: a list (or iterator, e.g. ``zip(grads, params)``) of
        ``(gradient, param)`` pairs, or a ``(grads, params)`` tuple of pytrees.

    Returns:
      The new parameters: a list in the order of the pairs, or a pytree.
    """
    grads, params, as_pairs = _split_grads_and_vars(grads_and_vars)
    new_params, _ = self._apply(grads, params)
    return list(new_params) if as_pairs else new_params

  @staticmethod
  def _params_of(var_list: Any) -> Any:
    return var_list() if callable(var_list) else var_list

  def _gradients(self, loss: Any, params: Any, grad_loss: Any = None) -> Any:
    if not callable(loss):
      raise TypeError(
        "`loss` must be a callable of the parameters, `loss(params) -> "
        f"scalar`, got {type(loss).__name__}."
      )
    try:
      takes_params = bool(inspect.signature(loss).parameters)
    except (TypeError, ValueError):
      takes_params = True
    if not takes_params:
      raise TypeError(
        "`loss` takes no arguments: JAX differentiates a function of the "
        "parameters, so pass `lambda params: ...` (the parameters come from "
        "`var_list`)."
      )
    out, vjp = jax.vjp(loss, params)
    if grad_loss is None:
      cotangent = jnp.ones_like(out)
    else:
      cotangent = jnp.asarray(grad_loss, jnp.asarray(out).dtype)
      if cotangent.shape != jnp.shape(out):
        raise ValueError(
          f"`grad_loss` has shape {cotangent.shape}, but the loss has shape "
          f"{jnp.shape(out)}."
        )
    (grads,) = vjp(cotangent)
    return grads

  def minimize(self, loss: Any, var_list: Any, grad_loss: Any = None) -> Any:
    """One step on the gradients of ``loss``; returns the new parameters.

    Args:
      loss: a callable ``loss(params)`` returning the loss (a non-scalar loss
        is summed, as ``tf.GradientTape`` does, unless ``grad_loss`` is given).
      var_list: the parameters, a pytree, or a zero-argument callable
        returning them (as Keras allows).
      grad_loss: optional cotangent of the loss, with the loss's shape.
    """
    params = self._params_of(var_list)
    grads = self._gradients(loss, params, grad_loss)
    return self._apply(grads, params)[0]

  def get_gradients(self, loss: Any, params: Any) -> Any:
    """The gradients of ``loss(params)``, a pytree like ``params``."""
    return self._gradients(loss, self._params_of(params))

  def get_updates(self, loss: Any, params: Any) -> Any:
    """One step on ``loss``, returning the updates instead of the new params.

    The state advances (iterations, averages and slots); add the updates
    with ``optax.apply_updates(params, updates)``.
    """
    params = self._params_of(params)
    return self._apply(self._gradients(loss, params), params)[1]

  # -- averages --------------------------------------------------------------

  def _params_index(self) -> list[tuple[tuple[Any, ...], Any]]:
    return [(p, x) for p, x in _leaf_paths(self._params) if x is not None]

  def assign_average_vars(self, var_list: Any) -> Any:
    """``var_list`` with each parameter replaced by its average.

    A leaf is matched to its average by identity with the latest parameters,
    else by its pytree path. Leaves with no average come back unchanged, with
    a warning (as TFA warns). Averages come back in the leaves' dtypes.
    """
    self._require_built("assign_average_vars")
    averaged = _averaged.averaged_params(self._state, self._params)
    by_path = dict(_leaf_paths(averaged))
    by_id = {id(x): (x, p) for p, x in self._params_index()}
    missing = []

    def pick(path: tuple[Any, ...], x: Any) -> Any:
      if x is None:
        return None
      found = by_id.get(id(x))
      where = found[1] if found is not None and found[0] is x else path
      average = by_path.get(where)
      if average is None or jnp.shape(average) != jnp.shape(x):
        missing.append(_tree_utils.keystr(path))
        return x
      return jnp.asarray(average).astype(jnp.asarray(x).dtype)

    out = jax.tree_util.tree_map_with_path(pick, var_list, is_leaf=_tree_utils.is_none)
    if missing:
      warnings.warn(
        f"{len(missing)} variable(s) have no average and are returned "
        f"unchanged: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}.",
        UserWarning,
        stacklevel=2,
      )
    return out

  def swap_weights(self, params: Any) -> Any:
    """Exchanges the parameters and their averages, exactly.

    Returns the averages (in the parameters' dtypes) and keeps ``params`` as
    the new averages: calling it twice gives back ``params`` unchanged when
    the averages share the parameters' dtypes (TFA swapped with additions and
    subtractions, which rounds).
    """
    self._require_built("swap_weights")
    averaged = _averaged.averaged_params(self._state, params)

    def keep(a: Any, p: Any) -> Any:
      if _tree_utils.is_none_or_masked(a):
        return a
      return jnp.asarray(p).astype(jnp.asarray(a).dtype)

    average = jax.tree.map(
      keep, self._state.average, params, is_leaf=_tree_utils.is_none_or_masked
    )
    self._state = self._state._replace(average=average)
    self._params = averaged
    return averaged

  # -- slots -----------------------------------------------------------------

  def _path_of(self, var: Any, caller: str) -> tuple[Any, ...]:
    if self._params is None:
      raise ValueError(
        f"`{caller}` needs the parameters, which are not known yet: call "
        "`build(params)` or apply a step first."
      )
    index = self._params_index()
    if isinstance(var, (int, np.integer)) and not isinstance(var, bool):
      var = (int(var),)
    if isinstance(var, str):
      for path, _ in index:
        simple = [str(_simple_key(e)) for e in path]
        if var in (jax.tree_util.keystr(path), "/".join(simple), ".".join(simple)):
          return path
    elif isinstance(var, tuple):
      for path, _ in index:
        if var == path or var == tuple(_simple_key(e) for e in path):
          return path
    else:
      for path, leaf in index:
        if leaf is var:
          return path
    known = ", ".join(_tree_utils.keystr(p) for p, _ in index[:6])
    raise KeyError(
      f"`{caller}`: `var` ({type(var).__name__}) is not one of the parameters "
      f"of the latest step ({known}{', ...' if len(index) > 6 else ''}); pass "
      "its path, e.g. ('layer', 'w') or \"['layer']['w']\", or the array "
      "itself from the latest parameters."
    )

  def _inner_slots(self) -> dict[str, Any]:
    """Param-shaped fields of the wrapped optimizer's state, by field name."""
    if self._state is None:
      return {}
    reference = [
      (p, jnp.shape(x)) for p, x in _leaf_paths(self._state.average) if x is not None
    ]
    found: dict[str, Any] = {}

    def shaped_like_params(tree: Any) -> bool:
      leaves = [(p, jnp.shape(x)) for p, x in _leaf_paths(tree) if x is not None]
      return leaves == reference and jax.tree.structure(
        tree, is_leaf=_tree_utils.is_none_or_masked
      ) == jax.tree.structure(
        self._state.average, is_leaf=_tree_utils.is_none_or_masked
      )

    def walk(tree: Any) -> None:
      if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for field in tree._fields:
          value = getattr(tree, field)
          if field not in found and shaped_like_params(value):
            found[field] = value
          else:
            walk(value)
      elif isinstance(tree, (tuple, list)):
        for value in tree:
          walk(value)
      elif isinstance(tree, dict):
        for value in tree.values():
          walk(value)

    walk(self._state.inner_state)
    return found

  def get_slot_names(self) -> list[str]:
    """``"average"``, the wrapped optimizer's slots (e.g. ``"mu"``, ``"nu"``),
    then the slots made by :meth:`add_slot`."""
    names = ["average", *self._inner_slots()]
    for _, name in self._slots:
      if name not in names:
        names.append(name)
    return names

  def get_slot(self, var: Any, slot_name: str) -> jax.Array:
    """The slot ``slot_name`` of one parameter.

    Args:
      var: the parameter, by its pytree path (a tuple of keys such as
        ``("dense", "kernel")``, a key path, a string such as
        ``"['dense']['kernel']"`` or ``"dense/kernel"``, or an int index for a
        list of parameters), or the array itself from the latest parameters.
      slot_name: ``"average"``, a slot of the wrapped optimizer (an optax
        state field such as ``"mu"``, ``"nu"``, ``"trace"``; Keras's ``"m"``,
        ``"v"``, ``"momentum"`` are understood) or one made by
        :meth:`add_slot`.

    Raises:
      KeyError: an unknown parameter or slot name.
    """
    self._require_built("get_slot")
    path = self._path_of(var, "get_slot")
    if (path, slot_name) in self._slots:
      return self._slots[(path, slot_name)]
    if slot_name == "average":
      tree = self._state.average
    else:
      inner = self._inner_slots()
      field = slot_name if slot_name in inner else _KERAS_SLOT_NAMES.get(slot_name)
      if field not in inner:
        raise KeyError(
          f"`slot_name` {slot_name!r} is not a slot of this optimizer; its "
          f"slots are {self.get_slot_names()}."
        )
      tree = inner[field]
    leaf = dict(_leaf_paths(tree)).get(path)
    if leaf is None or isinstance(leaf, optax.MaskedNode):
      raise KeyError(
        f"The parameter at {_tree_utils.keystr(path)} has no {slot_name!r} slot."
      )
    return leaf

  def add_slot(self, var: Any, slot_name: str, initializer: Any = "zeros") -> jax.Array:
    """Creates (or returns the existing) slot ``slot_name`` for ``var``.

    The new array has the parameter's shape and dtype, is kept with the state,
    is returned by :meth:`get_slot` and :attr:`weights`, and is restored by
    :meth:`set_weights`. ``initializer`` is ``"zeros"``, ``"ones"``, a number,
    an array, or a callable ``(shape, dtype) -> array``.
    """
    self._require_built("add_slot")
    if not isinstance(slot_name, str):
      raise TypeError(f"`slot_name` must be a str, got {slot_name!r}.")
    path = self._path_of(var, "add_slot")
    if (path, slot_name) in self._slots:
      return self._slots[(path, slot_name)]
    if slot_name == "average" or slot_name in self._inner_slots():
      return self.get_slot(path, slot_name)
    leaf = dict(_leaf_paths(self._params))[path]
    value = _initial_value(initializer, jnp.shape(leaf), jnp.asarray(leaf).dtype)
    self._slots[(path, slot_name)] = value
    return value

  def add_weight(
    self,
    name: str,
    shape: Any,
    dtype: Any = None,
    initializer: Any = "zeros",
    trainable: bool | None = None,
  ) -> jax.Array:
    """Creates a named array kept with the state and listed in :attr:`weights`.

    ``dtype`` defaults to float32; ``initializer`` is as in :meth:`add_slot`.
    Optimizer weights are not trainable: ``trainable=True`` is an error.
    """
    if not isinstance(name, str):
      raise TypeError(f"`name` must be a str, got {name!r}.")
    if name in self._extra_weights:
      raise ValueError(f"`name` {name!r} is already a weight of this optimizer.")
    if trainable:
      raise ValueError(
        "`trainable` must be None or False: optimizer weights are not trained."
      )
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    value = _initial_value(initializer, shape, jnp.dtype(dtype or jnp.float32))
    self._extra_weights[name] = value
    return value

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
    if not isinstance(config, Mapping):
      raise TypeError(f"`config` must be a dict, got {type(config).__name__}.")
    config = _copy_config(dict(config))
    if "optimizer" not in config:
      raise ValueError("`config` has no 'optimizer' entry.")
    optimizer, optimizer_kwargs = _restore_optimizer(
      config.pop("optimizer"), custom_objects
    )
    clash = sorted(set(optimizer_kwargs) & set(config))
    if clash:
      raise ValueError(
        f"`config` sets {', '.join(clash)} both at the top level and in the "
        "optimizer's config."
      )
    return cls(optimizer, **config, **optimizer_kwargs)


class MovingAverage(_AveragedOptimizer):
  """TFA's ``tfa.optimizers.MovingAverage`` over :func:`moving_average`.

  A stateful convenience for porting Keras code: it keeps the optimizer state
  inside and works on parameter pytrees, each step returning the new
  parameters. The averaging is exactly :func:`optax_ema.moving_average`'s
  (see there for the decay rule), available as :attr:`tx`.

  Args:
    optimizer: an optax transformation, or the name of an optax optimizer
      (``"sgd"``, ``"adam"``, ...), built with ``optax.inject_hyperparams``
      and Keras's default learning rate unless ``learning_rate`` is given.
    sequential_update: average the parameters after the step (TFA's default)
      or before it.
    average_decay: the decay, a float in [0, 1] or a schedule.
    num_updates: optional; clamps the decay to ``(1 + n) / (10 + n)``.
    name: the optimizer's name, kept in the config.
    start_step: before this many steps the average copies the parameters.
    dynamic_decay: ramp the decay up as ``(1 + t) / (10 + t)``.
    **kwargs: Keras's ``clipnorm``, ``clipvalue``, ``global_clipnorm``; for an
      optimizer given by name, ``learning_rate`` (or the deprecated ``lr``),
      ``decay`` (``lr / (1 + decay * t)``) and the optimizer's own arguments.

  Attributes:
    tx: the functional ``optax.GradientTransformationExtraArgs``.
    name: the name given.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_ema
    >>> opt = optax_ema.MovingAverage("sgd", average_decay=0.5, learning_rate=2.0)
    >>> params = [jnp.array([1.0, 2.0])]
    >>> for _ in range(2):
    ...   params = opt.apply_gradients(zip([jnp.array([0.1, 0.1])], params))
    >>> print(opt.iterations, [f"{x:.2f}" for x in params[0]])
    2 ['0.60', '1.60']
    >>> print([f"{x:.2f}" for x in opt.assign_average_vars(params)[0]])
    ['0.75', '1.75']

  References:
    TensorFlow Addons, ``tfa.optimizers.MovingAverage``.
  """

  def __init__(
    self,
    optimizer: optax.GradientTransformation | str,
    sequential_update: bool = True,
    average_decay: Any = 0.99,
    num_updates: int | None = None,
    name: str = "MovingAverage",
    *,
    start_step: int = 0,
    dynamic_decay: bool = False,
    **kwargs: Any,
  ) -> None:
    self._averaging = {
      "average_decay": _optimizers._jsonable(average_decay),
      "sequential_update": sequential_update,
      "num_updates": num_updates,
      "start_step": start_step,
      "dynamic_decay": dynamic_decay,
    }
    super().__init__(
      optimizer,
      name,
      kwargs,
      lambda inner: _core.moving_average(
        inner,
        average_decay,
        sequential_update=sequential_update,
        num_updates=num_updates,
        start_step=start_step,
        dynamic_decay=dynamic_decay,
      ),
    )

  def _averaging_config(self) -> dict[str, Any]:
    return dict(self._averaging)

  def average_op(self, var: Any, average_var: Any) -> Any:
    """One moving-average step with the decay of the next step.

    Returns ``average_var - (average_var - var) * (1 - d)``, ``d`` being the
    decay the step number :attr:`iterations` uses.
    """
    a = self._averaging
    decay = _core.tfa_decay(
      jnp.asarray(self.iterations, jnp.int32),
      a["average_decay"],
      num_updates=a["num_updates"],
      start_step=a["start_step"],
      dynamic_decay=bool(a["dynamic_decay"]),
    )
    return _core.average_op(var, average_var, decay)


class SWA(_AveragedOptimizer):
  """TFA's ``tfa.optimizers.SWA`` over :func:`optax_ema.swa`.

  The stochastic-weight-averaging counterpart of :class:`MovingAverage`, with
  the same members; :attr:`tx` is ``optax_ema.swa(...)``.

  Args:
    optimizer: an optax transformation or the name of an optax optimizer.
    start_averaging: the number of steps before the first snapshot.
    average_period: a snapshot every this many steps.
    name: the optimizer's name, kept in the config.
    **kwargs: as for :class:`MovingAverage`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_ema
    >>> opt = optax_ema.SWA("sgd", 0, 1, learning_rate=1.0)
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> for _ in range(3):
    ...   params = opt.apply_gradients(({"w": jnp.array([0.1, 0.1])}, params))
    >>> print([f"{x:.2f}" for x in opt.assign_average_vars(params)["w"]])
    ['0.80', '1.80']

  References:
    TensorFlow Addons, ``tfa.optimizers.SWA``.
  """

  def __init__(
    self,
    optimizer: optax.GradientTransformation | str,
    start_averaging: int = 0,
    average_period: int = 10,
    name: str = "SWA",
    **kwargs: Any,
  ) -> None:
    self._averaging = {
      "average_period": average_period,
      "start_averaging": start_averaging,
    }
    super().__init__(
      optimizer,
      name,
      kwargs,
      lambda inner: _swa.swa(inner, start_averaging, average_period),
    )

  def _averaging_config(self) -> dict[str, Any]:
    return dict(self._averaging)

  def average_op(self, var: Any, average_var: Any) -> Any:
    """The SWA average after a step at :attr:`iterations` with new value ``var``."""
    return _swa.swa_average_op(
      var,
      average_var,
      self.iterations,
      self._averaging["start_averaging"],
      self._averaging["average_period"],
    )
