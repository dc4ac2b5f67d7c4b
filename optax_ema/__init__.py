"""optax_ema: exponential moving averages of parameters for Optax.

A JAX port of TensorFlow Addons' ``tfa.optimizers.MovingAverage`` as a pure
functional :class:`optax.GradientTransformationExtraArgs` wrapper. The wrapped
optimizer's updates are returned unchanged; the state additionally holds an
exponential moving average of the parameters, read back with
:func:`averaged_params`.
"""

from optax_ema import posthoc
from optax_ema import schedules
from optax_ema._average_op import average_op
from optax_ema._averages import Averages
from optax_ema._averages import DebiasedAverage
from optax_ema._batch_stats import TreeAverage
from optax_ema._batch_stats import recompute_batch_stats
from optax_ema._batch_stats import recompute_nnx_batch_stats
from optax_ema._batch_stats import tree_average
from optax_ema._diagnostics import diagnostics
from optax_ema._flax import averaged_nnx_model
from optax_ema._flax import averaged_nnx_state
from optax_ema._flax import averaged_train_state
from optax_ema._moving_average import MovingAverageState
from optax_ema._power_ema import PowerEmaState
from optax_ema._reading import averaged_params
from optax_ema._resume import resume_with_average
from optax_ema._sharding import state_shardings
from optax_ema._swa import SWAState
from optax_ema._upgrade import restore_checkpoint
from optax_ema._upgrade import upgrade_state
from optax_ema.compat import SWA
from optax_ema.compat import MovingAverage
from optax_ema.compat import moving_average
from optax_ema.compat import power_ema
from optax_ema.compat import swa

__version__ = "0.2.0.dev0"

__all__ = [
  "SWA",
  "Averages",
  "DebiasedAverage",
  "MovingAverage",
  "MovingAverageState",
  "PowerEmaState",
  "SWAState",
  "TreeAverage",
  "average_op",
  "averaged_nnx_model",
  "averaged_nnx_state",
  "averaged_params",
  "averaged_train_state",
  "diagnostics",
  "moving_average",
  "posthoc",
  "power_ema",
  "recompute_batch_stats",
  "recompute_nnx_batch_stats",
  "restore_checkpoint",
  "resume_with_average",
  "schedules",
  "state_shardings",
  "swa",
  "tree_average",
  "upgrade_state",
]
