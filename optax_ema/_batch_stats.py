"""BatchNorm statistics for averaged weights: recomputed, or averaged alongside.

Averaged weights need their own BatchNorm statistics: the running statistics
of training were produced by the live weights. :func:`recompute_batch_stats`
(Flax linen) and :func:`recompute_nnx_batch_stats` (Flax NNX) set each
BatchNorm layer's statistics to the plain mean, over a few batches, of the
statistics that layer computes on each batch (PyTorch's ``update_bn`` with
``momentum=None``). :func:`tree_average` keeps an average of any tree (the
running statistics themselves) next to an optimizer, with the averaging of an
optax_ema transformation, without changing that optimizer's state.

Flax is imported only when a Flax helper is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ema import _reading
from optax_ema import _tree_utils
from optax_ema import _validation
from optax_ema import _variables

_FLAX_HINT = (
  "requires Flax, which is not installed: `pip install flax` "
  "(or `pip install optax-ema[flax]`)."
)


def _import(caller: str, module: str) -> Any:
  try:
    return importlib.import_module(f"flax.{module}")
  except ImportError as err:
    raise ImportError(f"`{caller}` {_FLAX_HINT}") from err


def _training_call(nn: Any, module: Any, args: tuple[Any, ...], kwargs: Any) -> bool:
  """Whether a linen ``BatchNorm.__call__`` computes batch statistics."""
  flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  return not nn.merge_param("use_running_average", module.use_running_average, flag)


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path) or "<root>"


def recompute_batch_stats(
  apply_fn: Callable[..., Any],
  params: Any,
  batch_stats: Any,
  batches: Iterable[Any],
  **apply_kwargs: Any,
) -> Any:
  """Recomputes a Flax linen model's BatchNorm statistics for given weights.

  Runs ``apply_fn({"params": params, "batch_stats": ...}, batch,
  mutable=["batch_stats"], **apply_kwargs)`` on every batch and returns, for
  each ``nn.BatchNorm`` layer, the mean over the batches of the mean and
  variance that layer computed on each batch:

  .. math::

    \\mu = \\frac{1}{n} \\sum_{b=1}^{n} \\mu_b, \\qquad
    \\sigma^2 = \\frac{1}{n} \\sum_{b=1}^{n} \\sigma^2_b

  as PyTorch's ``torch.optim.swa_utils.update_bn`` does (its
  ``momentum=None``), rather than a few passes at the layer's momentum,
  which would keep a trace of the statistics the passes started from. Each
  layer normalises with its batch statistics during the passes (as in
  training), so a layer's statistics are those of its inputs under the new
  weights. Use it on averaged weights (SWA, a long EMA) before evaluating
  them.

  Args:
    apply_fn: the model's ``apply`` (``model.apply``, ``state.apply_fn``).
    params: the weights to compute statistics for, e.g.
      ``optax_ema.averaged_params(state.opt_state, state.params)``.
    batch_stats: the model's ``batch_stats`` collection (its structure and
      dtypes; the values are not used).
    batches: an iterable of inputs, each passed as ``apply_fn``'s second
      argument; a few dozen training batches are usually enough.
    **apply_kwargs: passed to ``apply_fn``: the flag that puts BatchNorm in
      training mode (``train=True``, ``use_running_average=False``), and
      ``rngs`` if the model needs them in that mode.

  Returns:
    A ``batch_stats`` tree with the structure and dtypes of ``batch_stats``.

  Raises:
    ImportError: Flax is not installed.
    ValueError: ``batches`` is empty; a statistic that no ``nn.BatchNorm``
      computed in training mode (pass the training flag in
      ``apply_kwargs``); a layer called more than once per pass; a layer
      with ``momentum=1``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_ema
    >>> from flax import linen as nn
    >>> model = nn.BatchNorm(use_running_average=False, momentum=0.9)
    >>> variables = model.init(jax.random.key(0), jnp.ones((4, 1)))
    >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [8.0]])]
    >>> params, running = variables["params"], variables["batch_stats"]
    >>> stats = optax_ema.recompute_batch_stats(
    ...   model.apply, params, running, batches
    ... )
    >>> mean, var = stats["mean"][0], stats["var"][0]
    >>> print(f"{mean:.2f} {var:.2f}")  # (1 + 6) / 2, (1 + 4) / 2
    3.50 2.50
  """
  nn = _import("recompute_batch_stats", "linen")
  batches = _validation.checked_batches(batches)
  momenta: dict[tuple[str, ...], float] = {}
  calls: dict[tuple[str, ...], int] = {}

  def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    module = context.module
    if (
      isinstance(module, nn.BatchNorm)
      and context.method_name == "__call__"
      and not module.is_initializing()
      and _training_call(nn, module, args, kwargs)
    ):
      path = tuple(module.scope.path)
      calls[path] = calls.get(path, 0) + 1
      momenta[path] = float(module.momentum)
    return next_fun(*args, **kwargs)

  zeros = jax.tree.map(jnp.zeros_like, batch_stats)

  def one_pass(params: Any, batch: Any) -> Any:
    variables = {"params": params, "batch_stats": zeros}
    with nn.intercept_methods(interceptor):
      _, mutated = apply_fn(variables, batch, mutable=["batch_stats"], **apply_kwargs)
    return mutated["batch_stats"]

  run = jax.jit(one_pass)
  total: Any = None
  for batch in batches:
    calls.clear()
    stats = run(params, batch)  # traced on the first batch only
    if total is None:
      total, layers = _per_batch_layers(stats, momenta, calls), dict(momenta)
    total = _accumulate(total, stats, layers)
  n = len(batches)
  sums, likes = jax.tree_util.tree_leaves_with_path(total), jax.tree.leaves(batch_stats)
  if len(sums) != len(likes):
    raise ValueError(
      "`batch_stats` does not have the structure of the statistics the model "
      f"computes ({len(likes)} arrays, expected {len(sums)} at "
      f"{', '.join(jax.tree_util.keystr(p) for p, _ in sums[:3])}...)."
    )
  leaves = [
    (s / n).astype(jnp.asarray(like).dtype)
    for (_, s), like in zip(sums, likes, strict=True)
  ]
  return _tree_utils.structure(batch_stats).unflatten(leaves)


def _per_batch_layers(
  stats: Any, momenta: dict[tuple[str, ...], float], calls: dict[tuple[str, ...], int]
) -> Any:
  """Checks one traced pass; returns the zero float32 sums to accumulate."""
  for path, count in calls.items():
    if count > 1:
      raise ValueError(
        f"`recompute_batch_stats`: the BatchNorm at {_path_str(path)} is called "
        f"{count} times per pass; its statistics would mix the calls. Recompute "
        "them by hand for a layer that is shared."
      )
  for path, momentum in momenta.items():
    if momentum == 1.0:
      raise ValueError(
        f"`recompute_batch_stats`: the BatchNorm at {_path_str(path)} has "
        "momentum 1, so it never takes the statistics of a batch."
      )
  for key_path, _ in jax.tree_util.tree_flatten_with_path(stats)[0]:
    names = tuple(str(getattr(k, "key", k)) for k in key_path)
    if not any(names[: len(p)] == p for p in momenta):
      raise ValueError(
        f"`recompute_batch_stats`: no nn.BatchNorm computed the statistic "
        f"{_path_str(names)} in training mode. Pass the flag that puts the "
        "model's BatchNorm layers in training mode through `apply_kwargs` "
        "(e.g. `train=True` or `use_running_average=False`)."
      )
  return jax.tree.map(lambda s: jnp.zeros(jnp.shape(s), jnp.float32), stats)


def _accumulate(total: Any, stats: Any, momenta: dict[tuple[str, ...], float]) -> Any:
  """``total`` plus one pass's statistics, each divided by its layer's 1 - m.

  A pass from zero statistics leaves ``(1 - m) * s`` in a layer of momentum
  ``m``; dividing by ``1 - m`` (as float32, as the layer multiplied) gives
  ``s`` to float32 rounding.
  """

  def leaf(key_path: Any, t: Any, s: Any) -> Any:
    names = tuple(str(getattr(k, "key", k)) for k in key_path)
    (momentum,) = [m for p, m in momenta.items() if names[: len(p)] == p][:1]
    scale = jnp.asarray(1 - momentum, jnp.asarray(s).dtype)
    return t + (jnp.asarray(s) / scale).astype(jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, total, stats)


def recompute_nnx_batch_stats(
  model: Any,
  batches: Iterable[Any],
  forward: Callable[[Any, Any], Any] | None = None,
) -> None:
  """Recomputes an NNX model's BatchNorm statistics, in place.

  Sets every ``nnx.BatchNorm`` of ``model`` to the mean over ``batches`` of
  the mean and variance it computes on each batch (PyTorch's ``update_bn``
  with ``momentum=None``; see :func:`recompute_batch_stats` for the rule).
  During the passes only the BatchNorm layers are put in training mode (at
  momentum 0, normalising with their batch statistics); every other layer
  stays as it is, so call ``model.eval()`` first to keep dropout off. Their
  ``momentum`` and ``use_running_average`` are restored afterwards.

  Args:
    model: the ``nnx.Module`` to update, typically the copy
      :func:`averaged_nnx_model` returns.
    batches: an iterable of inputs.
    forward: ``forward(model, batch)`` runs the model on one batch (default
      ``model(batch)``); it is traced with ``nnx.jit``.

  Returns:
    None: ``model``'s ``nnx.BatchStat`` variables hold the new statistics.

  Raises:
    ImportError: Flax is not installed.
    ValueError: ``batches`` is empty, ``model`` has no ``nnx.BatchNorm``, or
      ``forward`` left a BatchNorm's statistics untouched.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_ema
    >>> from flax import nnx
    >>> model = nnx.BatchNorm(1, momentum=0.9, rngs=nnx.Rngs(0))
    >>> model.eval()
    >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [8.0]])]
    >>> optax_ema.recompute_nnx_batch_stats(model, batches)
    >>> print(f"{model.mean[0]:.2f} {model.var[0]:.2f}")  # (1+6)/2, (1+4)/2
    3.50 2.50
  """
  nnx = _import("recompute_nnx_batch_stats", "nnx")
  batches = _validation.checked_batches(batches)
  layers = [
    (path, node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.BatchNorm)
  ]
  if not layers:
    raise ValueError(
      f"`model` ({type(model).__name__}) has no nnx.BatchNorm layer: there are "
      "no statistics to recompute."
    )
  saved = [(bn.momentum, bn.use_running_average) for _, bn in layers]
  zeros = [jnp.zeros(jnp.shape(_get(bn.mean)), jnp.float32) for _, bn in layers]
  sums = [(z, z) for z in zeros]
  run_forward = forward if forward is not None else (lambda m, b: m(b))
  run = nnx.jit(lambda m, b: run_forward(m, b))
  try:
    for _, bn in layers:
      bn.momentum, bn.use_running_average = 0.0, False
    for batch in batches:
      for _, bn in layers:
        _set(bn.mean, jnp.zeros_like(_get(bn.mean)))
        _set(bn.var, jnp.zeros_like(_get(bn.var)))
      run(model, batch)
      for i, (path, bn) in enumerate(layers):
        mean = jnp.asarray(_get(bn.mean), jnp.float32)
        var = jnp.asarray(_get(bn.var), jnp.float32)
        if not (jnp.any(mean != 0) | jnp.any(var != 0)):
          raise ValueError(
            f"`forward` did not compute the statistics of the BatchNorm at "
            f"{_path_str(path)} (they stayed zero): it must run that layer on "
            "the batch."
          )
        sums[i] = (sums[i][0] + mean, sums[i][1] + var)
  finally:
    for (_, bn), (momentum, use_running_average) in zip(layers, saved, strict=True):
      bn.momentum, bn.use_running_average = momentum, use_running_average
  n = len(batches)
  for (_, bn), (mean_sum, var_sum) in zip(layers, sums, strict=True):
    _set(bn.mean, (mean_sum / n).astype(_get(bn.mean).dtype))
    _set(bn.var, (var_sum / n).astype(_get(bn.var).dtype))


def _get(variable: Any) -> Any:
  return _variables.value(variable)


def _set(variable: Any, value: Any) -> None:
  setter = getattr(variable, "set_value", None)
  if callable(setter):
    setter(value)
  else:  # flax < 0.11
    variable.value = value


class TreeAverage(NamedTuple):
  """An average of a tree kept beside an optimizer: see :func:`tree_average`.

  Attributes:
    init: ``init(tree)`` returns the first state, the average at ``tree``.
    update: ``update(tree, state)`` moves the average one step towards
      ``tree`` and returns the new state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> swa = optax_ema.swa(optax.identity(), 0, 1)
    >>> tracker = optax_ema.tree_average(swa)
    >>> state = tracker.init({"var": jnp.array([9.0])})
    >>> for v in (1.0, 3.0):
    ...   state = tracker.update({"var": jnp.array([v])}, state)
    >>> print(optax_ema.averaged_params(state)["var"])  # mean of 1 and 3
    [2.]
  """

  init: Callable[[Any], optax.OptState]
  update: Callable[[Any, optax.OptState], optax.OptState]


def tree_average(tx: optax.GradientTransformation) -> TreeAverage:
  """Keeps an average of any tree (e.g. BatchNorm statistics) with ``tx``'s rule.

  An optax_ema transformation averages the parameters it updates. Other
  state, such as BatchNorm running statistics, is not updated by the
  optimizer; ``tree_average(tx)`` averages such a tree with ``tx``'s
  averaging (decay, schedule, debiasing, SWA period...) in a state of its
  own, so the optimizer's state keeps its layout. Call its ``update`` once
  per real training step, after the step, with the new tree; read the
  average with :func:`optax_ema.averaged_params`.

  Args:
    tx: an optax_ema averaging transformation, usually wrapping
      ``optax.identity()``, e.g. ``optax_ema.swa(optax.identity())`` or
      ``optax_ema.moving_average(optax.identity(), 0.999)``; its updates are
      discarded.

  Returns:
    A :class:`TreeAverage`: ``state = init(tree)``, ``state = update(tree,
    state)`` (traceable under ``jax.jit``).

  Raises:
    ValueError: (from ``init``) ``tx`` keeps no averaging state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> stats = {"mean": jnp.array([0.0])}
    >>> tracker = optax_ema.tree_average(
    ...   optax_ema.moving_average(optax.identity(), average_decay=0.5)
    ... )
    >>> state = tracker.init(stats)
    >>> state = tracker.update({"mean": jnp.array([4.0])}, state)
    >>> print(optax_ema.averaged_params(state, stats)["mean"])
    [2.]
  """

  def init(tree: Any) -> optax.OptState:
    state = tx.init(_variables.strip(tree))
    _reading.find_average_state(state, caller="tree_average")
    return state

  def update(tree: Any, state: optax.OptState) -> optax.OptState:
    tree = _variables.strip(tree)
    zeros = jax.tree.map(jnp.zeros_like, tree)
    _, state = tx.update(zeros, state, tree)
    return state

  return TreeAverage(init, update)
