"""TFA's ``MovingAverage`` and ``SWA`` classes, as stateful conveniences.

Thin classes over :func:`optax_ema.moving_average` and :func:`optax_ema.swa`
with every member of the TensorFlow Addons optimizers, for porting Keras code
member by member and for quick scripts. They work on parameter pytrees (JAX
arrays are immutable: every step returns the new parameters) and keep the
optimizer state inside. For anything else (``jit`` around a whole training
step, ``optax.chain``, Flax ``TrainState``) use the functional ``tx``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from optax_ema import _average_op
from optax_ema import _moving_average
from optax_ema import _rules
from optax_ema import _swa
from optax_ema.compat import _config
from optax_ema.compat import _optimizers
from optax_ema.compat import _slots
from optax_ema.compat import _weights


class _AveragedOptimizer(_weights.Weights, _slots.Slots, _config.Config):
  """Every member shared by :class:`MovingAverage` and :class:`SWA`."""


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
    >>> opt = optax_ema.MovingAverage(
    ...   "sgd", average_decay=0.5, learning_rate=2.0
    ... )
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
      lambda inner: _moving_average.moving_average(
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
    rule = _rules.decay_rule(
      a["average_decay"],
      num_updates=a["num_updates"],
      start_step=a["start_step"],
      dynamic_decay=bool(a["dynamic_decay"]),
    )
    decay = rule.step(jnp.asarray(self.iterations, jnp.int32)).decay
    return _average_op.average_op(var, average_var, decay)


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
    ...   grads = {"w": jnp.array([0.1, 0.1])}
    ...   params = opt.apply_gradients((grads, params))
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
