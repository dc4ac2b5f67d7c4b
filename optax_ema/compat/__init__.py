"""Keras and TFA compatibility, at the edge of the package.

Optimizers given by name with Keras's keyword arguments (the public
``optax_ema.moving_average``, ``power_ema`` and ``swa`` accept them), and
TFA's stateful ``MovingAverage`` and ``SWA`` classes. The functional core
never sees a name: it takes optax transformations.
"""

from optax_ema.compat._by_name import moving_average
from optax_ema.compat._by_name import power_ema
from optax_ema.compat._by_name import swa
from optax_ema.compat._classes import SWA
from optax_ema.compat._classes import MovingAverage

__all__ = [
  "SWA",
  "MovingAverage",
  "moving_average",
  "power_ema",
  "swa",
]
