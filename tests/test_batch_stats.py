"""BatchNorm statistics for averaged weights: recomputed, or averaged alongside.

The references are NumPy forward passes in training mode: each BatchNorm layer
normalises with its batch's mean and (biased) variance, and the expected
statistics are the plain means of those over the batches (PyTorch's
``update_bn`` with ``momentum=None``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ema

EPS = 1e-5


def _batches(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(16, 3)) * (1 + i) + i).astype(np.float32) for i in range(n)]


def _np_stats(layers, batches):
  """Per-batch BatchNorm statistics of Dense-BN-relu-...-Dense, averaged.

  ``layers`` is a list of (kernel, bias, scale, bn_bias) in float64.
  """
  means = [[] for _ in layers]
  vars_ = [[] for _ in layers]
  for x in batches:
    h = np.asarray(x, np.float64)
    for i, (w, b, scale, shift) in enumerate(layers):
      h = h @ w + b
      mu, var = h.mean(axis=0), h.var(axis=0)
      means[i].append(mu)
      vars_[i].append(var)
      h = np.maximum((h - mu) / np.sqrt(var + EPS) * scale + shift, 0.0)
  return [np.mean(m, axis=0) for m in means], [np.mean(v, axis=0) for v in vars_]


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    for width in (4, 3):
      x = nn.Dense(width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS)(x)
      x = nn.relu(x)
    return nn.Dense(1)(x)


def _linen_setup():
  model = _Linen()
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
  params = variables["params"]
  # Non-trivial BatchNorm scales and offsets.
  params = jax.tree.map(lambda p: p, params)
  params["BatchNorm_0"]["scale"] = jnp.array([1.5, 0.5, 1.0, 2.0])
  params["BatchNorm_1"]["bias"] = jnp.array([0.3, -0.2, 0.1])
  return model, params, variables["batch_stats"]


def _linen_layers(params):
  f = lambda x: np.asarray(x, np.float64)
  return [
    (
      f(params[f"Dense_{i}"]["kernel"]),
      f(params[f"Dense_{i}"]["bias"]),
      f(params[f"BatchNorm_{i}"]["scale"]),
      f(params[f"BatchNorm_{i}"]["bias"]),
    )
    for i in range(2)
  ]


def test_linen_statistics_are_the_mean_of_per_batch_statistics():
  model, params, batch_stats = _linen_setup()
  batches = _batches()
  got = optax_ema.recompute_batch_stats(
    model.apply, params, batch_stats, [jnp.asarray(b) for b in batches], train=True
  )
  means, vars_ = _np_stats(_linen_layers(params), batches)
  for i in range(2):
    np.testing.assert_allclose(
      got[f"BatchNorm_{i}"]["mean"], means[i], rtol=2e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      got[f"BatchNorm_{i}"]["var"], vars_[i], rtol=2e-5, atol=1e-6
    )
  assert jax.tree.structure(got) == jax.tree.structure(batch_stats)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))


def test_linen_statistics_are_not_those_of_passes_at_the_layer_momentum():
  # Training-mode passes at momentum 0.9 from the initial statistics (zeros
  # and ones) would stay far from the per-batch means.
  model, params, batch_stats = _linen_setup()
  batches = [jnp.asarray(b) for b in _batches()]
  stats = batch_stats
  for b in batches:
    _, mutated = model.apply(
      {"params": params, "batch_stats": stats}, b, train=True, mutable=["batch_stats"]
    )
    stats = mutated["batch_stats"]
  means, _ = _np_stats(_linen_layers(params), [np.asarray(b) for b in batches])
  assert not np.allclose(stats["BatchNorm_0"]["mean"], means[0], rtol=1e-2)


def test_linen_without_the_training_flag_is_an_error():
  model, params, batch_stats = _linen_setup()
  batches = [jnp.asarray(b) for b in _batches(1)]
  with pytest.raises(
    ValueError, match=r"BatchNorm_0/mean in training mode.*train=True"
  ):
    optax_ema.recompute_batch_stats(
      model.apply, params, batch_stats, batches, train=False
    )
  with pytest.raises(ValueError, match=r"`batches` must hold at least one batch"):
    optax_ema.recompute_batch_stats(model.apply, params, batch_stats, [], train=True)


def test_linen_a_frozen_layer_is_an_error():
  model = nn.BatchNorm(use_running_average=False, momentum=1.0)
  variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
  with pytest.raises(ValueError, match=r"momentum 1"):
    optax_ema.recompute_batch_stats(
      model.apply, variables["params"], variables["batch_stats"], [jnp.ones((2, 1))]
    )


class _Nnx(nnx.Module):
  def __init__(self, rngs):
    self.lin1 = nnx.Linear(3, 4, rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, momentum=0.9, epsilon=EPS, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.lin2 = nnx.Linear(4, 3, rngs=rngs)
    self.bn2 = nnx.BatchNorm(3, momentum=0.99, epsilon=EPS, rngs=rngs)
    self.out = nnx.Linear(3, 1, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.lin1(x)))
    x = nnx.relu(self.bn2(self.lin2(self.drop(x))))
    return self.out(x)


def _nnx_layers(model):
  f = lambda v: np.asarray(v[...], np.float64)
  return [
    (f(model.lin1.kernel), f(model.lin1.bias), f(model.bn1.scale), f(model.bn1.bias)),
    (f(model.lin2.kernel), f(model.lin2.bias), f(model.bn2.scale), f(model.bn2.bias)),
  ]


def test_nnx_statistics_are_the_mean_of_per_batch_statistics():
  model = _Nnx(nnx.Rngs(0))
  model.bn1.scale[...] = jnp.array([1.5, 0.5, 1.0, 2.0])
  model.eval()  # dropout off; the helper switches the BatchNorm layers only
  batches = _batches()
  optax_ema.recompute_nnx_batch_stats(model, [jnp.asarray(b) for b in batches])
  means, vars_ = _np_stats(_nnx_layers(model), batches)
  for bn, mean, var in zip((model.bn1, model.bn2), means, vars_, strict=True):
    np.testing.assert_allclose(bn.mean[...], mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], var, rtol=2e-5, atol=1e-6)
  # The layers are as they were: eval mode, their own momentum.
  assert model.bn1.use_running_average and model.bn2.use_running_average
  assert (model.bn1.momentum, model.bn2.momentum) == (0.9, 0.99)


def test_nnx_forward_that_skips_a_layer_is_an_error():
  model = _Nnx(nnx.Rngs(0))
  model.eval()
  with pytest.raises(ValueError, match=r"BatchNorm at bn2.*stayed zero"):
    optax_ema.recompute_nnx_batch_stats(
      model, [jnp.ones((4, 3))], forward=lambda m, x: m.bn1(m.lin1(x))
    )
  assert model.bn1.momentum == 0.9 and model.bn1.use_running_average
  with pytest.raises(ValueError, match=r"no nnx.BatchNorm"):
    optax_ema.recompute_nnx_batch_stats(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), [1])
  with pytest.raises(ValueError, match=r"`batches` must hold at least one batch"):
    optax_ema.recompute_nnx_batch_stats(model, [])


def test_tree_average_keeps_the_swa_mean_of_a_tree():
  trees = [
    {"mean": jnp.asarray(b[0]), "var": jnp.asarray(b[1] ** 2)} for b in _batches(4)
  ]
  tracker = optax_ema.tree_average(optax_ema.swa(optax.identity(), 0, 1))
  state = jax.jit(tracker.init)(trees[0])
  update = jax.jit(tracker.update)
  for tree in trees[1:]:
    state = update(tree, state)
  got = optax_ema.averaged_params(state, trees[0])
  for key in ("mean", "var"):
    want = np.mean([np.asarray(t[key], np.float64) for t in trees[1:]], axis=0)
    np.testing.assert_allclose(got[key], want, rtol=1e-6)


def test_tree_average_of_nnx_batch_stats_updates_a_model():
  model = _Nnx(nnx.Rngs(0))
  tracker = optax_ema.tree_average(
    optax_ema.moving_average(optax.identity(), average_decay=0.5)
  )
  state = tracker.init(nnx.state(model, nnx.BatchStat))
  history = []
  for b in _batches(3):
    model(jnp.asarray(b))  # train mode: the running statistics move
    history.append(np.asarray(model.bn1.mean[...], np.float64))
    state = tracker.update(nnx.state(model, nnx.BatchStat), state)
  averaged = optax_ema.averaged_params(state, nnx.state(model, nnx.BatchStat))
  assert isinstance(averaged["bn1"]["mean"], nnx.BatchStat)
  want = np.zeros(4)
  for h in history:
    want = 0.5 * want + 0.5 * h
  copy = nnx.clone(model)
  nnx.update(copy, averaged)
  np.testing.assert_allclose(copy.bn1.mean[...], want, rtol=1e-6)
  assert not np.allclose(model.bn1.mean[...], want)


def test_tree_average_needs_an_averaging_transformation():
  with pytest.raises(ValueError, match=r"`tree_average` found no averaging state"):
    optax_ema.tree_average(optax.sgd(0.1)).init({"m": jnp.zeros(2)})
