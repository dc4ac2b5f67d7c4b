"""Sharded jit on a 2x4 mesh of fake CPU devices.

Params are sharded FSDP style over "data" (rows) and tensor-parallel over
"model" (columns). Every average leaf must keep exactly its param's
sharding, the compiled step must not all-gather anything, and the numbers
must equal the unsharded run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema

SPECS = {
  "w1": P("data", "model"),
  "b1": P("model"),
  "w2": P("model", "data"),
  "scale": P(),
}


def _mesh():
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  return jax.sharding.Mesh(devices, ("data", "model"))


def _params():
  rng = np.random.default_rng(4)
  return {
    "w1": jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32) * 0.3),
    "b1": jnp.zeros(16),
    "w2": jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32) * 0.3),
    "scale": jnp.ones([]),
  }


def _batch():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(32, 8)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(np.tanh(x[:, :4]))


def _loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean((p["scale"] * h @ p["w2"] - y) ** 2)


def _tx():
  return optax_ema.moving_average(
    optax.adamw(0.05), average_decay=0.9, dynamic_decay=True, skip_nonfinite=True
  )


def _shardings(mesh):
  return {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}


def _state_shardings(tx, params, param_shardings, mesh):
  """How to get the state's shardings: eval_shape + optax.tree_map_params."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract,
    param_shardings,
    transform_non_params=lambda _: NamedSharding(mesh, P()),
  )


def _train_step(tx):
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _assert_average_sharded_like_params(state, param_shardings):
  for k, sharding in param_shardings.items():
    assert state.average[k].sharding == sharding, (k, state.average[k].sharding)
    assert state.average[k].sharding.spec == SPECS[k]


def test_jit_init_keeps_each_average_in_its_param_sharding():
  mesh = _mesh()
  shardings = _shardings(mesh)
  params = jax.device_put(_params(), shardings)
  tx = _tx()
  state = jax.jit(tx.init)(params)  # sharding propagation only
  _assert_average_sharded_like_params(state, shardings)
  state_shardings = _state_shardings(tx, params, shardings, mesh)
  assert state_shardings.average == shardings
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  _assert_average_sharded_like_params(state, shardings)
  # Eagerly too; and the copy is a new buffer, not an alias of the params.
  state = tx.init(params)
  _assert_average_sharded_like_params(state, shardings)
  pointer = lambda a: a.addressable_shards[0].data.unsafe_buffer_pointer()
  assert pointer(state.average["w1"]) != pointer(params["w1"])


def test_jitted_step_keeps_shardings_and_equals_the_unsharded_run():
  mesh = _mesh()
  shardings = _shardings(mesh)
  tx = _tx()
  data = NamedSharding(mesh, P("data"))
  x, y = _batch()
  params = jax.device_put(_params(), shardings)
  state = jax.jit(tx.init)(params)
  step = jax.jit(_train_step(tx))
  xs, ys = jax.device_put(x, data), jax.device_put(y, data)
  for _ in range(3):
    params, state = step(params, state, xs, ys)
    _assert_average_sharded_like_params(state, shardings)
  for k, sharding in shardings.items():
    assert params[k].sharding == sharding

  ref_params = _params()
  ref_state = tx.init(ref_params)
  for _ in range(3):
    ref_params, ref_state = jax.jit(_train_step(tx))(ref_params, ref_state, x, y)
  for k in SPECS:
    np.testing.assert_allclose(
      np.asarray(state.average[k]),
      np.asarray(ref_state.average[k]),
      rtol=2e-5,
      atol=1e-6,
    )
    assert not np.allclose(np.asarray(state.average[k]), np.asarray(_params()[k]))
  assert int(state.count) == 3


def test_compiled_optimizer_step_has_no_all_gather():
  mesh = _mesh()
  shardings = _shardings(mesh)
  tx = _tx()
  params = jax.device_put(_params(), shardings)
  state_shardings = _state_shardings(tx, params, shardings, mesh)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  grads = jax.device_put(jax.tree.map(jnp.ones_like, _params()), shardings)

  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(
    update,
    in_shardings=(shardings, state_shardings, shardings),
    out_shardings=(shardings, state_shardings),
    donate_argnums=(0, 1),
  )
  hlo = jitted.lower(params, state, grads).compile().as_text()
  assert "all-gather" not in hlo
  assert "all-to-all" not in hlo
  _new_params, new_state = jitted(params, state, grads)
  _assert_average_sharded_like_params(new_state, shardings)
  # adamw's first step moves every entry by lr * (sign + weight decay) and
  # the first dynamic decay is min(0.9, 1/10) = 0.1.
  p0 = {k: np.asarray(v, np.float64) for k, v in _params().items()}
  for k in SPECS:
    p1 = p0[k] - 0.05 * (1.0 + 1e-4 * p0[k])
    want = p0[k] - (p0[k] - p1) * (1 - 0.1)
    np.testing.assert_allclose(
      np.asarray(new_state.average[k]), want, rtol=1e-5, atol=1e-6
    )


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


RECIPE_CASES = {
  "masked": lambda: optax_ema.moving_average(
    optax.adamw(0.05), 0.9, mask={"w1": True, "b1": False, "w2": True, "scale": False}
  ),
  "callable_mask": lambda: optax_ema.moving_average(
    optax.adamw(0.05), 0.9, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  ),
  "several_debiased": lambda: optax_ema.moving_average(
    optax.adamw(0.05), {"fast": 0.9, "slow": 0.99}, debias=True
  ),
  "power_ema_masked": lambda: optax_ema.power_ema(
    optax.adamw(0.05), mask={"w1": True, "b1": True, "w2": True, "scale": False}
  ),
}


def _average_trees(state):
  """The param-shaped average trees of a state, and its scalar leaves."""
  if isinstance(state, optax_ema.PowerEmaState):
    return list(state.averages.values()), [state.count]
  average = state.average
  slots = average.averages if isinstance(average, optax_ema.Averages) else [average]
  trees = [s.average if isinstance(s, optax_ema.DebiasedAverage) else s for s in slots]
  weights = [s.weight for s in slots if isinstance(s, optax_ema.DebiasedAverage)]
  return trees, [state.count, *jax.tree.leaves(state.step_size), *weights]


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_sharding_recipe_gives_param_shardings_to_averages_and_replicates_the_rest(
  case,
):
  # The recipe of the docs: eval_shape + optax.tree_map_params, with
  # is_leaf=MaskedNode for masked states (as for optax.masked).
  mesh = _mesh()
  shardings = _shardings(mesh)
  replicated = NamedSharding(mesh, P())
  tx = RECIPE_CASES[case]()
  params = jax.device_put(_params(), shardings)
  specs = optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    jax.eval_shape(tx.init, params),
    shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=_is_masked,
  )
  spec_trees, spec_scalars = _average_trees(specs)
  for tree in spec_trees:
    assert tree == shardings  # a sharding stands for a masked-out leaf, too
  assert all(s == replicated for s in spec_scalars)
  assert specs.inner_state[0].mu == shardings  # adamw's moments, as usual
  state = jax.jit(tx.init, out_shardings=specs)(params)
  trees, scalars = _average_trees(state)
  for tree in trees:
    for k, leaf in tree.items():
      if not _is_masked(leaf):
        assert leaf.sharding.spec == SPECS[k], (case, k)
  assert all(s.sharding.spec == P() for s in scalars)
  step = jax.jit(_train_step(tx), out_shardings=(shardings, specs))
  _, state = step(params, state, *_batch())
  assert all(
    leaf.sharding.spec == SPECS[k]
    for tree in _average_trees(state)[0]
    for k, leaf in tree.items()
    if not _is_masked(leaf)
  )


def test_overwrite_every_keeps_shardings_and_equals_the_unsharded_run():
  mesh = _mesh()
  shardings = _shardings(mesh)
  tx = optax_ema.moving_average(optax.adamw(0.05), 0.8, overwrite_every=2)
  x, y = _batch()
  params = jax.device_put(_params(), shardings)
  state = jax.jit(tx.init)(params)
  step = jax.jit(_train_step(tx))
  ref_params, ref_state = _params(), tx.init(_params())
  for _ in range(4):
    params, state = step(params, state, x, y)
    ref_params, ref_state = step(ref_params, ref_state, x, y)
  for k, sharding in shardings.items():
    assert params[k].sharding == sharding
    np.testing.assert_allclose(params[k], ref_params[k], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(params[k], state.average[k], rtol=1e-6, atol=1e-7)


def _collectives(tx, with_hand_ema=False):
  mesh = _mesh()
  shardings = _shardings(mesh)
  params = jax.device_put(_params(), shardings)
  x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in _batch())
  state = jax.jit(tx.init)(params)
  ema = jax.tree.map(jnp.copy, params)

  def step(params, state, ema, x, y):
    updates, state = tx.update(jax.grad(_loss)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
    if with_hand_ema:
      ema = jax.tree.map(lambda e, p: e + 0.1 * (p - e), ema, params)
    return params, state, ema

  hlo = jax.jit(step).lower(params, state, ema, x, y).compile().as_text()
  return {op: hlo.count(f" {op}(") for op in ("all-gather", "all-reduce", "all-to-all")}


def test_the_average_adds_no_collective_to_a_training_step():
  # Sharded and replicated ("scale") params, a batch sharded over "data":
  # the step has the collectives of adamw alone, as with a hand-written EMA.
  alone = _collectives(optax.adamw(0.05))
  ema = optax_ema.moving_average(optax.adamw(0.05), 0.9, dynamic_decay=True)
  assert _collectives(ema) == alone
  assert _collectives(optax.adamw(0.05), with_hand_ema=True) == alone
  # skip_nonfinite asks whether every shard is finite: scalar all-reduces.
  checked = _collectives(_tx())
  assert checked["all-gather"] == alone["all-gather"]
  assert checked["all-reduce"] > alone["all-reduce"]


def _recipe_collectives(tx, with_hand_ema=False):
  """Collectives of a training step compiled as the integrations guide does.

  In and out shardings from ``optax_ema.state_shardings``, the state donated;
  the scale is a ``(16,)`` vector replicated on every device.
  """
  mesh = _mesh()
  shardings = {**_shardings(mesh), "scale": NamedSharding(mesh, P())}
  params = jax.device_put({**_params(), "scale": jnp.ones(16)}, shardings)
  state_shardings = optax_ema.state_shardings(tx, params)
  state = jax.eval_shape(tx.init, params)
  if with_hand_ema:
    state, state_shardings = (state, params), (state_shardings, shardings)
  batch = NamedSharding(mesh, P("data"))
  x, y = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch) for a in _batch())

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean(((p["scale"] * h) @ p["w2"] - y) ** 2)

  def step(params, state, x, y):
    inner = state[0] if with_hand_ema else state
    updates, inner = tx.update(jax.grad(loss)(params, x, y), inner, params)
    params = optax.apply_updates(params, updates)
    if with_hand_ema:
      ema = jax.tree.map(lambda e, p: e + 0.1 * (p - e), state[1], params)
      return params, (inner, ema)
    return params, inner

  jitted = jax.jit(
    step,
    in_shardings=(shardings, state_shardings, batch, batch),
    out_shardings=(shardings, state_shardings),
    donate_argnums=(0, 1),
  )
  hlo = jitted.lower(params, state, x, y).compile().as_text()
  kinds = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter")
  return {op: hlo.count(f" {op}(") for op in kinds}


def test_the_guides_recipe_adds_an_all_gather_for_a_replicated_vector_as_by_hand():
  # XLA updates the replicated scale sharded and all-gathers the new value;
  # it does the same for its average, ours or a hand-written one: one
  # all-gather more than adamw alone (the guide states these counts).
  alone = _recipe_collectives(optax.adamw(0.05))
  ema = _recipe_collectives(optax_ema.moving_average(optax.adamw(0.05), 0.9))
  hand = _recipe_collectives(optax.adamw(0.05), with_hand_ema=True)
  assert ema == hand
  assert ema == {**alone, "all-gather": alone["all-gather"] + 1}
