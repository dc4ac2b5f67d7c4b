"""Evaluation helpers for Flax: linen ``TrainState`` and NNX models.

Flax is optional: nothing here imports it at module import time, so
``import optax_ema`` works without it. The NNX helpers import ``flax.nnx`` when
called and say how to install it if it is missing.
"""

from __future__ import annotations

from typing import Any

from optax_ema import _reading
from optax_ema import _validation
from optax_ema import _variables

_FLAX_HINT = (
  "requires Flax, which is not installed: `pip install flax` "
  "(or `pip install optax-ema[flax]`)."
)


def _import_nnx(caller: str) -> Any:
  try:
    from flax import nnx
  except ImportError as err:
    raise ImportError(f"`{caller}` {_FLAX_HINT}") from err
  return nnx


def _graph_kwargs(optimizer: Any) -> dict[str, Any]:
  """``graph=`` as the optimizer holds it (flax>=0.12), else nothing."""
  graph = getattr(optimizer, "graph", None)
  return {} if graph is None else {"graph": graph}


def averaged_train_state(state: Any, *, which: Any = None) -> Any:
  """Returns a copy of a Flax ``TrainState`` whose params are the averages.

  The copy is meant for evaluation and export: ``state.apply_fn`` runs the
  averaged model with ``averaged.apply_fn({"params": averaged.params}, x)``.
  Only ``params`` changes: ``step``, ``opt_state`` and any extra field of a
  ``TrainState`` subclass (for example ``batch_stats``) are those of
  ``state``. Parameters are returned in their own dtypes, and leaves that are
  not averaged (masked out, or not floating point) are the current params.

  BatchNorm running statistics are not parameters, so they are not averaged:
  the copy keeps the live ``batch_stats``, which the live parameters produced.
  For the averaged parameters, recompute them with
  :func:`optax_ema.recompute_batch_stats` (the mean of the per-batch
  statistics over a few batches), or keep an average of ``batch_stats``
  beside the optimizer with :func:`optax_ema.tree_average`.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or any Flax struct
      with ``params``, ``opt_state`` and ``replace``) whose optimizer holds
      one :func:`optax_ema.moving_average` state, anywhere in
      ``optax.chain`` and the like.
    which: passed to :func:`optax_ema.averaged_params` for states that hold
      several averages.

  Returns:
    ``state.replace(params=averaged_params(state.opt_state, state.params))``.

  Raises:
    TypeError: ``state`` has no ``params``, ``opt_state`` or ``replace``.
    ValueError: no averaging state, or more than one, in ``state.opt_state``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from flax.training import train_state
    >>> state = train_state.TrainState.create(
    ...   apply_fn=lambda variables, x: variables["params"]["w"] * x,
    ...   params={"w": jnp.array([1.0, 2.0])},
    ...   tx=optax_ema.moving_average(optax.sgd(2.0), average_decay=0.5),
    ... )
    >>> for _ in range(2):
    ...   state = state.apply_gradients(grads={"w": jnp.array([0.1, 0.1])})
    >>> averaged = optax_ema.averaged_train_state(state)
    >>> print([f"{x:.2f}" for x in averaged.params["w"]])
    ['0.75', '1.75']
    >>> print(int(averaged.step), [f"{x:.2f}" for x in state.params["w"]])
    2 ['0.60', '1.60']
  """
  _validation.check_train_state(state)
  found = _reading.find_average_states(state.opt_state)
  if len(found) != 1:
    # Let averaged_params raise its precise message, naming the state field.
    _reading.find_average_state(state.opt_state, caller="averaged_train_state")
  averaged = _reading.averaged_params(state.opt_state, state.params, which=which)
  return state.replace(params=averaged)


def averaged_nnx_state(model: Any, optimizer: Any, *, which: Any = None) -> Any:
  """Returns the averaged parameters of an NNX model as an ``nnx.State``.

  The state holds the variables ``optimizer.wrt`` selects (usually
  ``nnx.Param``) with their averaged values, in the params' dtypes: new
  ``Variable`` objects of the model's types with the model's metadata
  (sharding annotations included). Use ``nnx.update(copy_of_model,
  averaged_state)`` to load them into a copy of the model
  (:func:`averaged_nnx_model` does that). Variables the optimizer does not
  train, such as RNG keys and counts or counters, are not in it; BatchNorm
  statistics are in it, averaged, when ``wrt`` covers them
  (``wrt=(nnx.Param, nnx.BatchStat)``).

  The values are a copy taken now: unlike ``nnx.EMA.apply_to``, nothing here
  follows later optimizer steps. Call it again (it is cheap) after training
  on, e.g. before each evaluation. Calling
  ``optax_ema.averaged_params(optimizer.opt_state, nnx.state(model, wrt))``
  gives the same state.

  Args:
    model: the ``nnx.Module`` being trained.
    optimizer: the ``nnx.Optimizer`` built as ``nnx.Optimizer(model,
      tx, wrt=...)`` where ``tx`` holds one :func:`optax_ema.moving_average`.
    which: passed to :func:`optax_ema.averaged_params`.

  Returns:
    An ``nnx.State`` with the structure, variable types and metadata of
    ``nnx.state(model, optimizer.wrt)``, holding the averages.

  Raises:
    ImportError: Flax is not installed.
    TypeError: ``optimizer`` is not an ``nnx.Optimizer``.
    ValueError: no averaging state, or more than one, in the optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    >>> tx = optax_ema.moving_average(optax.sgd(1.0), 0.75)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss = lambda m: m.bias.sum()  # its gradient is one
    >>> for _ in range(2):
    ...   _ = optimizer.update(model, nnx.grad(loss)(model))
    >>> state = optax_ema.averaged_nnx_state(model, optimizer)
    >>> print(sorted(state), f"{state['bias'][0]:.4f} {model.bias[0]:.4f}")
    ['bias', 'kernel'] -0.6875 -2.0000
  """
  nnx = _import_nnx("averaged_nnx_state")
  _validation.check_nnx_optimizer(optimizer)
  params = nnx.state(model, optimizer.wrt, **_graph_kwargs(optimizer))
  opt_state = _variables.strip(optimizer.opt_state)
  found = _reading.find_average_states(opt_state)
  if len(found) != 1:
    _reading.find_average_state(opt_state, caller="averaged_nnx_state")
  return _reading.averaged_params(optimizer.opt_state, params, which=which)


def averaged_nnx_model(model: Any, optimizer: Any, *, which: Any = None) -> Any:
  """Returns a copy of an NNX model holding the averaged parameters.

  The copy is made with ``nnx.clone`` and then ``nnx.update`` with
  :func:`averaged_nnx_state`: its trained variables (``optimizer.wrt``) hold
  the averages, and every other variable (RNG keys and counts, BatchNorm
  statistics unless ``wrt`` covers them, counters) starts as a copy of the
  model's. Calling the copy never touches ``model``: its RNG streams,
  statistics and counters stay where they were. Put the copy in eval mode
  (``copy.eval()``) for evaluation, and give it its own BatchNorm statistics
  with :func:`optax_ema.recompute_nnx_batch_stats`.

  The copy does not follow later optimizer steps (``nnx.EMA.apply_to``'s
  model does): make a new one, or ``nnx.update(copy,
  averaged_nnx_state(model, optimizer))``, before each evaluation.

  Args:
    model: the ``nnx.Module`` being trained.
    optimizer: its ``nnx.Optimizer``, holding one
      :func:`optax_ema.moving_average` state.
    which: passed to :func:`optax_ema.averaged_params`.

  Returns:
    A new module of the same type as ``model``.

  Raises:
    The errors of :func:`averaged_nnx_state`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=0.5)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
    >>> _ = optimizer.update(model, grads)
    >>> eval_model = optax_ema.averaged_nnx_model(model, optimizer)
    >>> print(f"{eval_model.bias[0]:.3f} {model.bias[0]:.3f}")
    -0.050 -0.100
  """
  nnx = _import_nnx("averaged_nnx_model")
  averaged = averaged_nnx_state(model, optimizer, which=which)
  copy = nnx.clone(model, **_graph_kwargs(optimizer))
  nnx.update(copy, averaged)
  return copy
