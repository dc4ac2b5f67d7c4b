"""Flax NNX: nnx.Optimizer with moving_average and the eval-model helpers.

References are NumPy EMAs of the recorded Param trajectory.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ema

import helpers


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.lin1 = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.lin2 = nnx.Linear(4, 1, rngs=rngs)
    self.calls = nnx.Variable(jnp.array(0, jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


def _data():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(x.sum(axis=1, keepdims=True))


def _pure_params(model):
  return jax.tree.map(
    lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )


def _train(steps=3, decay=0.6):
  model = _Model(nnx.Rngs(params=0, dropout=1))
  tx = optax_ema.moving_average(optax.adam(0.05), average_decay=decay)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  trajectory = [_pure_params(model)]
  for _ in range(steps):
    step(model, optimizer)
    trajectory.append(_pure_params(model))
  want = helpers.np_ema(trajectory[0], trajectory[1:], [decay] * steps)
  return model, optimizer, trajectory, want


def _np_leaf(v):
  if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(v))
  return np.asarray(v)


def _other_vars(model):
  """RNG keys (as their data), counts, BatchNorm statistics, counters."""
  return jax.tree.map(_np_leaf, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))


def _assert_tree_close(got, want):
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-7),
    got,
    want,
  )


def test_nnx_optimizer_trains_and_tracks_the_average():
  _model, optimizer, trajectory, want = _train()
  assert not np.allclose(
    trajectory[0]["lin1"]["kernel"], trajectory[-1]["lin1"]["kernel"]
  )
  got = optax_ema.averaged_params(optimizer.opt_state)
  _assert_tree_close(nnx.to_pure_dict(got), want)
  assert int(optimizer.step[...]) == 3


def test_averaged_nnx_state_holds_the_averaged_params_only():
  model, optimizer, _, want = _train()
  state = optax_ema.averaged_nnx_state(model, optimizer)
  _assert_tree_close(nnx.to_pure_dict(state), want)
  assert "calls" not in state and "mean" not in state["bn"]


def test_averaged_nnx_model_has_averages_and_untouched_other_variables():
  model, optimizer, trajectory, want = _train()
  live_other = _other_vars(model)
  eval_model = optax_ema.averaged_nnx_model(model, optimizer)
  assert type(eval_model) is _Model and eval_model is not model
  _assert_tree_close(_pure_params(eval_model), want)
  # RNG keys and counts, BatchNorm statistics and the counter are copies.
  jax.tree.map(np.testing.assert_array_equal, _other_vars(eval_model), live_other)
  # The live model keeps its params; using the copy does not touch it.
  _assert_tree_close(_pure_params(model), trajectory[-1])
  x, _ = _data()
  eval_model(x)  # train mode: dropout draws, BatchNorm updates, counter ticks
  eval_model.eval()
  out = eval_model(x)
  assert out.shape == (8, 1) and np.all(np.isfinite(out))
  jax.tree.map(np.testing.assert_array_equal, _other_vars(model), live_other)
  assert int(live_other["calls"]) == 3
  # The copy's own RNG stream moved on (dropout drew once in train mode).
  assert int(_other_vars(eval_model)["drop"]["rngs"]["count"]) == (
    int(live_other["drop"]["rngs"]["count"]) + 1
  )
  assert int(nnx.state(eval_model)["calls"][...]) == 5


def test_nnx_helpers_reject_a_non_optimizer_and_a_plain_optimizer():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"`optimizer` must be an nnx\.Optimizer"):
    optax_ema.averaged_nnx_model(model, optax.sgd(0.1))
  plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"averaged_nnx_state.*no averaging state"):
    optax_ema.averaged_nnx_state(model, plain)


def test_nnx_helpers_say_how_to_install_flax_when_it_is_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)  # makes `from flax import nnx` fail
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  with pytest.raises(
    ImportError, match=r"`averaged_nnx_model` requires Flax.*pip install"
  ):
    optax_ema.averaged_nnx_model(model, object())


@pytest.mark.subprocess
def test_import_optax_ema_works_without_flax():
  code = (
    "import sys; sys.modules['flax'] = None; import optax_ema; "
    "print(optax_ema.averaged_train_state.__name__)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "averaged_train_state"


def test_averaged_params_and_diagnostics_take_nnx_states_as_handed_out():
  model, optimizer, trajectory, want = _train()
  params = nnx.state(model, nnx.Param)  # Param variables, no nnx.as_pure
  got = optax_ema.averaged_params(optimizer.opt_state, params)
  assert isinstance(got, nnx.State)
  assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(got, is_leaf=_is_var))
  _assert_tree_close(nnx.to_pure_dict(got), want)
  copy = nnx.clone(model)
  nnx.update(copy, got)
  _assert_tree_close(_pure_params(copy), want)
  _assert_tree_close(_pure_params(model), trajectory[-1])  # a copy: model untouched
  stats = optax_ema.diagnostics(optimizer.opt_state, params)
  live, avg = jax.tree.leaves(trajectory[-1]), jax.tree.leaves(want)
  diff = np.sqrt(sum(np.sum((a - p) ** 2) for a, p in zip(avg, live, strict=True)))
  ref = np.sqrt(sum(np.sum(p**2) for p in live))
  np.testing.assert_allclose(float(stats["drift"]), diff / ref, rtol=1e-5)
  assert int(stats["count"]) == 3


def _is_var(x):
  return isinstance(x, nnx.Variable)


def test_averaged_params_of_the_optimizer_state_alone_updates_a_model():
  model, optimizer, _, want = _train()
  got = optax_ema.averaged_params(optimizer.opt_state)
  assert isinstance(got, nnx.State)
  copy = nnx.clone(model)
  nnx.update(copy, got)
  _assert_tree_close(_pure_params(copy), want)


def test_nnx_helpers_keep_variable_metadata_and_sharding():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
  with jax.set_mesh(mesh):
    model = nnx.Linear(4, 8, kernel_init=init, rngs=nnx.Rngs(0))
    tx = optax_ema.moving_average(optax.sgd(0.1), average_decay=0.5)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    kernel0 = np.asarray(model.kernel[...])

    @nnx.jit
    def step(model, optimizer):
      loss = lambda m: jnp.sum(m(jnp.ones((2, 4))) ** 2)
      optimizer.update(model, nnx.grad(loss)(model))

    step(model, optimizer)
    want = 0.5 * kernel0 + 0.5 * np.asarray(model.kernel[...])
    for state in (
      optax_ema.averaged_params(optimizer.opt_state, nnx.state(model, nnx.Param)),
      optax_ema.averaged_nnx_state(model, optimizer),
    ):
      kernel = state["kernel"]
      assert isinstance(kernel, nnx.Param)
      assert kernel.get_metadata() == model.kernel.get_metadata()
      assert kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
      np.testing.assert_allclose(kernel[...], want, rtol=1e-6)
    eval_model = optax_ema.averaged_nnx_model(model, optimizer)
    assert eval_model.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
      None, "model"
    )


def test_wrt_covering_batch_stats_averages_them():
  model = _Model(nnx.Rngs(params=0, dropout=1))
  wrt = (nnx.Param, nnx.BatchStat)
  tx = optax_ema.moving_average(optax.adam(0.05), average_decay=0.6)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  x, y = _data()

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)

  means = [np.asarray(model.bn.mean[...], np.float64)]
  for _ in range(3):
    step(model, optimizer)
    means.append(np.asarray(model.bn.mean[...], np.float64))
  assert not np.allclose(means[1], means[-1])
  want = means[0]
  for m in means[1:]:
    want = want - (want - m) * 0.4
  state = optax_ema.averaged_nnx_state(model, optimizer)
  assert isinstance(state["bn"]["mean"], nnx.BatchStat)
  np.testing.assert_allclose(state["bn"]["mean"][...], want, rtol=1e-5, atol=1e-7)
  eval_model = optax_ema.averaged_nnx_model(model, optimizer)
  np.testing.assert_allclose(eval_model.bn.mean[...], want, rtol=1e-5, atol=1e-7)
