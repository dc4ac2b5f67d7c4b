"""Reading the averages out of any optimizer state.

Every averaging state of the package is found by type, wherever it sits in
an optimizer state (or in any pytree holding one), and read as a list of
:class:`View`: one per average it keeps, each with its key, the value
``which=`` can name it by, the averaged parameters (debiased where needed)
and its last step size.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ema import _averages
from optax_ema import _states
from optax_ema import _tree_utils
from optax_ema import _variables
from optax_ema import _warn

View = _states.View
is_average_state = _states.is_average_state


def find_average_states(opt_state: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """Every averaging state inside ``opt_state``, with its pytree path."""
  if is_average_state(opt_state):
    return [((), opt_state)]
  flat, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_average_state)
  return [(path, x) for path, x in flat if is_average_state(x)]


def _looks_restored_without_target(tree: Any) -> bool:
  """A state that Orbax restored without a target: dicts with our field names."""
  fields = [layout.restored_fields() for layout in _states.LAYOUTS.values()]
  found = False

  def visit(x: Any) -> None:
    nonlocal found
    if isinstance(x, dict):
      if any(f <= set(x) for f in fields):
        found = True
      for v in x.values():
        visit(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        visit(v)

  visit(tree)
  return found


def _is_optax_state(x: Any) -> bool:
  """A state of one optax transformation (a NamedTuple defined in optax)."""
  module = type(x).__module__
  is_optax = module == "optax" or module.startswith("optax.")
  return is_optax and isinstance(x, tuple) and hasattr(x, "_fields")


def _followers(node: Any, key: Any) -> list[Any]:
  """The states after ``key`` in ``node``, if ``node`` is a chain optax built.

  ``optax.chain`` keeps a plain tuple of its transformations' states and
  ``optax.named_chain`` a dict; a user's own tuple or dict (an optimizer
  state next to a step count, a second model's optimizer) holds other
  things. The sign of a chain is that what follows the average is a state
  of one optax transformation (``optax.scale``'s, ``scale_by_adam``'s...).
  """
  if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey):
    after = list(node[key.idx + 1 :])
  elif type(node) in (dict, collections.OrderedDict) and isinstance(
    key, jax.tree_util.DictKey
  ):
    keys = list(node)
    after = [node[k] for k in keys[keys.index(key.key) + 1 :]]
  else:
    return []
  return after if after and all(_is_optax_state(x) for x in after) else []


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  return None


def warn_if_not_last(opt_state: Any, path: tuple[Any, ...], caller: str) -> None:
  """Warns when the averaging state at ``path`` is not last in its chain.

  ``optax.chain(moving_average(opt), optax.scale(...))`` averages the params
  moved by ``opt``'s updates, which the following transformations change
  before they are applied: the average is of params that never exist (and
  ``overwrite_every`` moves the params onto them). ``update`` sees only its
  own state, so this is read from the root state, through the chains on the
  way to the average.
  """
  node, parallel = opt_state, False
  for key in path:
    # optax.multi_transform keeps a dict of states side by side, not a chain.
    after = [] if parallel else _followers(node, key)
    if after:
      names = ", ".join(type(x).__name__ for x in after)
      _warn.warn(
        f"`{caller}`: the averaging state is not last in its optax.chain (it "
        f"is followed by {names}): the transformations after it change the "
        "updates it averaged, so it averages params that training never "
        "has (and `overwrite_every` would move the params onto them). Put "
        "them inside the wrapper instead, e.g. "
        "`optax_ema.moving_average(optax.chain(opt, optax.scale(...)))`."
      )
      return
    parallel = isinstance(node, optax.MultiTransformState)
    node = _child(node, key)
    if node is None:
      return


def find_average_state(opt_state: Any, caller: str = "averaged_params") -> Any:
  """The single averaging state inside ``opt_state``; ValueError otherwise."""
  found = find_average_states(opt_state)
  if not found:
    names = ", ".join(sorted(t.__name__ for t in _states.LAYOUTS))
    if _looks_restored_without_target(opt_state):
      raise ValueError(
        f"`{caller}` found no averaging state ({names}) in `opt_state`, but it "
        "holds plain dicts and lists with their field names: it was restored "
        "(by Orbax) without a target. Restore it with a target, "
        "`jax.eval_shape(tx.init, params)`; for a checkpoint written by "
        "optax_ema 0.1.0, convert the restored tree with "
        "`optax_ema.upgrade_state(restored, jax.eval_shape(tx.init, params))`."
      )
    raise ValueError(
      f"`{caller}` found no averaging state ({names}) in `opt_state` "
      f"(a {type(opt_state).__name__}); was the optimizer wrapped with "
      "optax_ema.moving_average?"
    )
  if len(found) > 1:
    where = ", ".join(
      f"{type(s).__name__} at opt_state{_tree_utils.keystr(p)}" for p, s in found
    )
    raise ValueError(
      f"`{caller}` found {len(found)} averaging states in `opt_state`: "
      f"{where}; pass the one you want, e.g. `{caller}(opt_state[0], ...)`."
    )
  warn_if_not_last(opt_state, found[0][0], caller)
  return found[0][1]


def views(state: Any) -> tuple[type[_states.Layout], list[View]]:
  layout = _states.layout_of(state)
  return layout, layout.views(state)


def pick(state: Any, which: Any) -> View:
  """The view of ``state`` that ``which`` names (one rule for every state)."""
  layout, all_views = views(state)
  if which is None:
    if len(all_views) == 1:
      return all_views[0]
    raise ValueError(layout.missing_which(all_views))
  if len(all_views) == 1 and not layout.single_takes_which:
    raise ValueError(
      f"`which` must be None for a state with a single average, got {which!r}."
    )
  keys = [v.key for v in all_views]
  values = [v.value for v in all_views]
  try:
    return all_views[_averages.resolve_which(which, keys, values, layout.noun)]
  except ValueError as err:
    raise ValueError(f"{err}{layout.hint(all_views)}") from None


def averaged_params(
  opt_state: optax.OptState,
  params: optax.Params | None = None,
  *,
  which: Any = None,
) -> optax.Params:
  """Returns the averaged parameters held in an optimizer state.

  Finds the single :class:`MovingAverageState` (or other averaging state of
  this package) anywhere inside ``opt_state``: at its root, inside
  ``optax.chain`` / ``optax.named_chain`` / ``optax.inject_hyperparams`` /
  ``optax.MultiSteps`` / ``optax.masked`` states, or inside any pytree that
  holds one (e.g. a Flax ``TrainState``).

  Args:
    opt_state: an optimizer state, or any pytree holding one.
    params: optional current parameters. When given, float leaves come back
      in the params' dtypes, leaves that are not averaged (masked out, or not
      floating point) come from ``params``, and the structure is checked.
      It may be a whole model whose state was initialised on a filtered
      copy: an Equinox module where the state holds ``None`` for its
      activation functions, floats or integer buffers (anything there but a
      floating point array comes back as it is), or an NNX ``State`` of
      ``Variable`` objects such as ``nnx.state(model, nnx.Param)``.
    which: for a state that keeps several averages (``average_decay`` a
      tuple or dict, several ``sigma_rels``), which one to return: an
      index, a key, or a decay (``sigma_rel``) value, matched as float32.
      Required there (the error lists the choices); must be ``None`` for a
      state with one moving average.

  Returns:
    A pytree with the structure of the parameters: of ``params``' type when
    given (an Equinox module; an ``nnx.State`` of new ``Variable`` objects
    with the types and metadata of ``params``' ones, which ``nnx.update``
    takes), else of the state's (for an ``nnx.Optimizer``'s state, an
    ``nnx.State`` of plain arrays). A debiased average
    (``debias=True``) comes back bias-corrected, ``average / weight``, and
    as the initial params before the first averaging step.

  Raises:
    ValueError: no averaging state, or more than one, inside ``opt_state``; a
      masked state read without ``params``; ``params`` of another structure.

  Warns:
    UserWarning: the averaging state is followed by other transformations in
      an ``optax.chain`` / ``optax.named_chain`` (say ``optax.scale``): they
      change the updates after it averaged, so the average is of params that
      training never has. Put them inside the wrapper. (Read from the root
      state: ``update`` sees only its own. A tuple or dict of your own, whose
      other entries are not single optax transformations' states, is not
      taken for a chain.)

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_ema
    >>> params = {"w": jnp.ones(2, jnp.bfloat16)}
    >>> ema = optax_ema.moving_average(optax.sgd(0.1))
    >>> tx = optax.chain(optax.clip(1.0), ema)
    >>> state = tx.init(params)
    >>> avg = optax_ema.averaged_params(state, params)
    >>> print(avg["w"].dtype, avg["w"])
    bfloat16 [1 1]
  """
  original = params
  opt_state = _variables.strip(opt_state)
  params = _variables.strip(params)
  state = find_average_state(opt_state)
  view = pick(state, which)
  average = view.tree
  if params is None:
    masked = [
      _tree_utils.keystr(path)
      for path, leaf in _tree_utils.leaves_with_paths(average)
      if isinstance(leaf, optax.MaskedNode)
    ]
    if masked:
      raise ValueError(
        "`averaged_params` needs `params` for a state whose average is masked "
        f"(no average is kept at {', '.join(masked[:3])}"
        f"{', ...' if len(masked) > 3 else ''}): call "
        "`averaged_params(opt_state, params)`."
      )
    return average
  _tree_utils.check_like(
    average, params, "params", "the averaged parameters", static_ok=True
  )
  return _variables.rewrap(original, with_params(view, params))


def with_params(view: View, params: Any) -> Any:
  """``view``'s average in the params' dtypes, ``params`` where none is kept.

  Leaves that are not averaged (masked out, not floating point) come from
  ``params``, and so does a debiased average that has not averaged yet.
  """
  flat, treedef = _tree_utils.flatten(params, is_leaf=_tree_utils.is_none)
  averages = treedef.flatten_up_to(view.tree)
  empty = view.empty
  out, k = [], 0
  for p, a in zip(flat, averages, strict=True):
    array_index = k
    if p is None or _tree_utils.is_none_or_masked(a):
      out.append(p)
      continue
    k += 1
    if not (_tree_utils.is_float(a) and _tree_utils.is_float(p)):
      out.append(p)
      continue
    value = jnp.asarray(a).astype(jnp.asarray(p).dtype)
    if empty is not None:
      flag = empty[array_index] if jnp.ndim(empty) else empty
      value = jnp.where(flag, jnp.asarray(p), value)
    out.append(value)
  return treedef.unflatten(out)
