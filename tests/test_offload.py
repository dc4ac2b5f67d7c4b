"""``offload=True``: averages in host memory (``pinned_host``), sharded like the params.

On one device and on a 2x4 mesh of fake CPU devices: the memory kind and
sharding of every average leaf after init (eager and jitted) and after
donated steps; values equal to the same run without offload; steps that do
not average move nothing between host and device (checked on the jaxpr: on
CPU, XLA drops memory moves when it lowers); Orbax round trips.

An offloaded average is moved in device memory on CPU and GPU and on the
host's CPU on TPU (XLA host compute); the ``moved_on`` fixture runs a test
both ways here (``optax_ema._offload.FORCE``), as CPU can run either.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ema
from optax_ema import _offload

import helpers

SPECS = {"w": P("data", "model"), "b": P("model"), "s": P()}


def _mesh():
  return jax.make_mesh((2, 4), ("data", "model"))


def _params(mesh=None):
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=16), jnp.float32),
    "s": jnp.asarray(1.5, jnp.float32),
  }
  if mesh is None:
    return params
  return jax.device_put(params, {k: NamedSharding(mesh, v) for k, v in SPECS.items()})


def _grads(n, like):
  return [
    jax.tree.map(
      lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)) * jnp.sign(x + 0.3), like
    )
    for i in range(n)
  ]


CONFIGS = {
  "plain": lambda **o: optax_ema.moving_average(optax.adam(0.05), 0.9, **o),
  "several_debias": lambda **o: optax_ema.moving_average(
    optax.adam(0.05), {"fast": 0.5, "slow": 0.9}, debias=True, **o
  ),
  "masked": lambda **o: optax_ema.moving_average(
    optax.adam(0.05), 0.9, mask={"w": True, "b": False, "s": True}, **o
  ),
  "update_every": lambda **o: optax_ema.moving_average(
    optax.adam(0.05), 0.9, update_every=3, **o
  ),
  "bf16_storage": lambda **o: optax_ema.moving_average(
    optax.adam(0.05), 0.99, ema_dtype=jnp.bfloat16, **o
  ),
  "skip_nonfinite": lambda **o: optax_ema.moving_average(
    optax.adam(0.05), 0.9, skip_nonfinite=True, **o
  ),
  "multisteps": lambda **o: optax_ema.moving_average(
    optax.MultiSteps(optax.adam(0.05), 2), 0.9, **o
  ),
  "overwrite": lambda **o: optax_ema.moving_average(
    optax.adam(0.05), 0.8, update_every=2, overwrite_every=4, **o
  ),
  "power_ema": lambda **o: optax_ema.power_ema(optax.adam(0.05), (0.05, 0.1), **o),
  "swa": lambda **o: optax_ema.swa(optax.adam(0.05), 1, 2, **o),
}


def _average_leaves(state):
  """Every float average leaf of a state, and every other leaf of its slots."""
  found = optax_ema._reading.find_average_state(state)
  tree = found.averages if isinstance(found, optax_ema.PowerEmaState) else found.average
  averages, others = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path)
    if name.endswith(".weight"):
      others.append((name, leaf))
    else:
      averages.append((name, leaf))
  return found, averages, others


def _check_placement(state, mesh):
  found, averages, others = _average_leaves(state)
  for name, leaf in averages:
    assert leaf.sharding.memory_kind == "pinned_host", name
    if mesh is not None:
      key = name.split("['")[-1].rstrip("']")
      assert leaf.sharding.spec == SPECS[key], (name, leaf.sharding.spec)
  for name, leaf in others:
    assert leaf.sharding.memory_kind == "device", name
  assert found.count.sharding.memory_kind == "device"
  for leaf in jax.tree.leaves(found.inner_state):
    assert leaf.sharding.memory_kind == "device"


def _train(tx, params, steps=6, *, donate=True, init_jit=False):
  state = jax.jit(tx.init)(params) if init_jit else tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  history = []
  for g in _grads(steps, params):
    params, state = jitted(params, state, g)
    history.append(state)
  return params, state, history


@pytest.fixture(params=["device", "host"])
def moved_on(request, monkeypatch):
  """Where an offloaded average is moved: in device memory, or by the host."""
  monkeypatch.setattr(_offload, "FORCE", request.param)
  return request.param


@pytest.mark.parametrize("devices", [1, 8], ids=["1_device", "2x4_mesh"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_averages_live_in_host_memory_and_equal_the_run_without_offload(
  config, devices, moved_on
):
  mesh = _mesh() if devices == 8 else None
  params = _params(mesh)
  tx = CONFIGS[config](offload=True)
  _check_placement(tx.init(params), mesh)
  _check_placement(jax.jit(tx.init)(params), mesh)
  got_params, state, history = _train(tx, params)
  for s in history:
    _check_placement(s, mesh)
  want_params, want_state, _ = _train(CONFIGS[config](), _params(mesh))
  # In device memory the overwrite is a select fused into adam's update; in
  # host memory it is gated, the updates formed apart: XLA may round the
  # update differently (an FMA): a float32 rounding or so apart.
  same = helpers.assert_trees_identical
  if config == "overwrite":
    same = helpers.assert_tree_close
  same(got_params, want_params)
  which = {"several_debias": "slow", "power_ema": 0.1}.get(config)
  got = optax_ema.averaged_params(state, got_params, which=which)
  want = optax_ema.averaged_params(want_state, want_params, which=which)
  same(got, want)
  for leaf in jax.tree.leaves(got):
    assert leaf.sharding.memory_kind == "device"


def test_averaged_params_without_params_comes_back_in_device_memory():
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, debias=True, offload=True)
  _, state, _ = _train(tx, _params(_mesh()), steps=2)
  for leaf in jax.tree.leaves(optax_ema.averaged_params(state)):
    assert leaf.sharding.memory_kind == "device"


def _gates(eqn):
  """Whether ``eqn`` runs its sub-jaxprs only on some steps.

  A data-dependent ``cond`` or a ``while`` loop; not the ``cond`` that
  ``lax.platform_dependent`` stages out (lowering picks one of its branches).
  """
  if eqn.primitive.name == "cond":
    return eqn.params.get("branches_platforms") is None
  return eqn.primitive.name == "while"


def _on_host_cpu(eqn):
  return getattr(eqn.ctx, "compute_type", None) == "device_host"


def _host_computations(jaxpr, inside_cond=False, out=None):
  """(inside a gate?) of every computation run by the host's CPU."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if _on_host_cpu(eqn):
      out.append(inside_cond)
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _host_computations(sub, inside_cond or _gates(eqn), out)
  return out


def _transfers(jaxpr, inside_cond=False, out=None):
  """(inside a gate?, destination) of every host/device device_put.

  Not those inside a computation of the host's CPU (where every buffer is in
  host memory: they only give its arguments the default memory space).
  """
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if _on_host_cpu(eqn):
      continue
    if eqn.primitive.name == "device_put":
      spaces = [d for d in eqn.params["devices"] if isinstance(d, jax.memory.Space)]
      out.extend((inside_cond, d) for d in spaces)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _transfers(sub, inside_cond or _gates(eqn), out)
  return out


@pytest.mark.parametrize(
  "config", ["update_every", "multisteps", "skip_nonfinite", "overwrite", "swa"]
)
def test_steps_that_do_not_average_move_nothing_between_host_and_device(
  config, moved_on
):
  tx = CONFIGS[config](offload=True)
  params = _params(_mesh())
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jaxpr = jax.make_jaxpr(step)(params, state, params).jaxpr
  moves = _transfers(jaxpr)
  assert moves, "no host/device transfer at all"
  # Every transfer, and every computation of the host, sits in a gate (the
  # averaging one, or the overwrite's).
  assert all(inside for inside, _ in moves), moves
  on_host = _host_computations(jaxpr)
  assert all(on_host), on_host
  to_device = [d for _, d in moves if d == jax.memory.Space.Device]
  to_host = [d for _, d in moves if d == jax.memory.Space.Host]
  assert to_host
  if moved_on == "device":
    assert to_device and not on_host
  else:
    assert on_host


def test_a_step_that_averages_moves_each_average_once_each_way(moved_on):
  tx = optax_ema.moving_average(optax.adam(0.05), (0.9, 0.99), offload=True)
  params = _params()
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  moves = [d for _, d in _transfers(jaxpr)]
  n = 2 * len(jax.tree.leaves(params))  # two averages of three leaves
  if moved_on == "device":
    assert moves.count(jax.memory.Space.Device) == n
    assert moves.count(jax.memory.Space.Host) == n
    assert not _host_computations(jaxpr)
  else:
    # Each leaf's new params go over to the host, which moves the average
    # where it is (its result is marked as host memory too): no average
    # comes to device memory.
    assert moves.count(jax.memory.Space.Device) == 0
    assert moves.count(jax.memory.Space.Host) == 2 * n
    assert len(_host_computations(jaxpr)) == n


def test_on_tpu_the_host_moves_the_averages_and_elsewhere_the_device(monkeypatch):
  # Lowered for CPU (the platform a test runs on), the step holds no host
  # computation; which one a TPU gets is checked where a TPU compiler is
  # (the accelerator checks of tests_aot).
  tx = optax_ema.moving_average(optax.adam(0.05), 0.9, offload=True)
  params = _params()
  state = tx.init(params)

  def lowered():  # a new function each time: jit caches by function
    return jax.jit(lambda *a: tx.update(*a)).lower(params, state, params).as_text()

  assert "_xla_compute_type" not in lowered()
  monkeypatch.setattr(_offload, "FORCE", "host")
  assert '_xla_compute_type = "host"' in lowered()


def test_state_shardings_place_averages_on_host_and_moments_on_device():
  mesh = _mesh()
  params = _params(mesh)
  tx = optax.chain(optax.clip(1.0), CONFIGS["several_debias"](offload=True))
  shardings = optax_ema.state_shardings(tx, params)
  average = shardings[1].average
  for slot in average.averages:
    for k, s in slot.average.items():
      assert s.memory_kind == "pinned_host" and s.spec == SPECS[k]
    assert slot.weight.memory_kind == "device" and slot.weight.spec == P()
  for k, s in shardings[1].inner_state[0].mu.items():
    assert s.memory_kind == "device" and s.spec == SPECS[k]
  # They are what jit(tx.init) produces, and usable as its out_shardings.
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  got = jax.tree.map(lambda x: x.sharding, state)
  assert jax.tree.leaves(got) == jax.tree.leaves(shardings)


@pytest.mark.orbax
def test_orbax_round_trip_restores_into_host_memory(tmp_path):
  mesh = _mesh()
  params = _params(mesh)
  tx = CONFIGS["update_every"](offload=True)
  _, state, _ = _train(tx, params, steps=4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  shardings = optax_ema.state_shardings(tx, params)
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(tx.init, params),
    shardings,
  )
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(4, args=ocp.args.StandardRestore(target))
  _check_placement(restored, mesh)
  helpers.assert_trees_identical(restored, state)


def test_offload_must_be_a_bool():
  with pytest.raises(TypeError, match="`offload` must be a bool"):
    optax_ema.moving_average(optax.sgd(0.1), offload="yes")


def test_flax_helpers_give_device_params_from_an_offloaded_state():
  from flax import linen as nn
  from flax import nnx
  from flax.training import train_state

  tx = optax_ema.moving_average(optax.adam(1e-2), 0.9, offload=True)
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(2):
    nnx_step(model, optimizer, jnp.ones((4, 3)))
  average = nnx.as_pure(optimizer.opt_state).average
  assert {x.sharding.memory_kind for x in jax.tree.leaves(average)} == {"pinned_host"}
  eval_model = optax_ema.averaged_nnx_model(model, optimizer)
  assert eval_model.kernel[...].sharding.memory_kind == "device"
  assert not np.allclose(eval_model.kernel[...], model.kernel[...])

  dense = nn.Dense(2)
  state = train_state.TrainState.create(
    apply_fn=dense.apply,
    params=dense.init(jax.random.key(0), jnp.ones((1, 3)))["params"],
    tx=tx,
  )
  state = jax.jit(
    lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, s.params))
  )(state)
  averaged = optax_ema.averaged_train_state(state)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(averaged.params)} == {
    "device"
  }
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state.average)} == {
    "pinned_host"
  }


def _replicate(tree, n):
  return jax.tree.map(lambda a: jnp.stack([a] * n), tree)


def test_offload_under_pmap_init_is_refused_naming_it():
  # pmap puts its outputs in device memory: the average would silently not
  # be offloaded.
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, offload=True)
  n = jax.local_device_count()
  with pytest.raises(ValueError, match=r"`offload=True` does not work inside jax.pmap"):
    jax.pmap(tx.init)({"w": jnp.ones((n, 3))})


def test_offload_under_pmap_update_is_refused_before_jax_memory_kind_error():
  # The integrations guide's pmap recipe with an offloaded state: JAX would
  # fail with a memory-kind mismatch that does not say what to change.
  tx = optax_ema.moving_average(optax.sgd(0.1), 0.9, offload=True)
  n = jax.local_device_count()
  params = {"w": jnp.ones(3)}
  p_params, p_state = _replicate(params, n), _replicate(tx.init(params), n)
  with pytest.raises(ValueError, match=r"`offload=True`.*pmap.*state_shardings"):
    jax.pmap(tx.update, axis_name="batch")(p_params, p_state, p_params)


def test_offload_under_vmap_keeps_host_memory_and_the_values():
  grads = _grads(3, jnp.ones((4, 5)))
  out = {}
  for offload in (False, True):
    tx = optax_ema.moving_average(optax.adam(0.05), 0.9, offload=offload)
    params = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
    state = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(tx.update))
    for g in grads:
      updates, state = step(g, state, params)
      params = params + updates
    out[offload] = state.average
  assert out[True].sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(np.asarray(out[True]), np.asarray(out[False]))


def test_offload_under_shard_map_keeps_host_memory_and_the_values():
  mesh = jax.make_mesh((8,), ("d",))
  params = jax.device_put(
    jnp.asarray(np.random.default_rng(2).normal(size=(8, 3)), jnp.float32),
    NamedSharding(mesh, P("d")),
  )
  grads = _grads(3, params)
  out = {}
  for offload in (False, True):
    tx = optax_ema.moving_average(optax.adam(0.05), 0.9, offload=offload)
    shapes = jax.eval_shape(tx.init, jnp.ones((1, 3)))
    specs = jax.tree.map(lambda a: P("d") if a.ndim else P(), shapes)
    init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P("d"), out_specs=specs))
    step = jax.jit(
      jax.shard_map(
        tx.update,
        mesh=mesh,
        in_specs=(P("d"), specs, P("d")),
        out_specs=(P("d"), specs),
      )
    )
    p, state = params, init(params)
    for g in grads:
      updates, state = step(g, state, p)
      p = p + updates
    out[offload] = state.average
  assert out[True].sharding.memory_kind == "pinned_host"
  assert out[True].sharding.spec == P("d", None)
  np.testing.assert_array_equal(jax.device_get(out[True]), jax.device_get(out[False]))
