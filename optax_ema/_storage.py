"""How the averages are stored: their dtype, their rounding, their memory.

The three storage options of every averaging transform (``ema_dtype``,
``stochastic_rounding``, ``offload``) travel together as one
:class:`Storage`, validated once (:func:`optax_ema._validation.check_storage`)
and read by the engine.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple


class Storage(NamedTuple):
  """The storage of the floating-point averages.

  Attributes:
    dtype: the accumulator dtype (``ema_dtype``). ``None`` keeps float32 and
      float64 leaves in their own dtype and stores float16 and bfloat16
      leaves in float32.
    stochastic: how an average stored narrower than it is computed (a
      bfloat16 or float16 ``dtype``) is rounded: ``None`` (the default) and
      True round up or down at random, unbiased, with bits that are a fixed
      function of the step and the leaf; False rounds to nearest.
    offload: keep the averages in host memory (``pinned_host``) of their
      parameters' devices, bringing them over only on averaging steps.
  """

  dtype: Any = None
  stochastic: bool | None = None
  offload: bool = False
