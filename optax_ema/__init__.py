"""optax_ema: exponential moving averages of parameters for Optax.

A JAX port of TensorFlow Addons' ``tfa.optimizers.MovingAverage`` as a pure
functional :class:`optax.GradientTransformationExtraArgs` wrapper. The wrapped
optimizer's updates are returned unchanged; the state additionally holds an
exponential moving average of the parameters, read back with
:func:`averaged_params`.
"""

from optax_ema._averaged import averaged_params
from optax_ema._core import MovingAverageState
from optax_ema._core import average_op
from optax_ema._core import moving_average

__version__ = "0.1.0"

__all__ = [
  "MovingAverageState",
  "average_op",
  "averaged_params",
  "moving_average",
]
