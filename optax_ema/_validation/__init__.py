"""Every argument check of the package, in one place.

An argument check decides, from the values given to one call, whether that
call can go on: their types, ranges and combinations, and the deprecated
spellings among them. Every such check of the package is here, in one of the
modules below, and the rest of the package calls them instead of checking an
argument itself. Two kinds of check stay with what they read: comparisons
with what exists only at run time (a state against the params it was built
for, ``which=`` among a state's averages, the snapshots on disk and a
directory's lock, the members of a built stateful optimizer), and the
domains of the power-profile math (:mod:`optax_ema._power_math`, whose
functions take arrays).

Checks run at construction, or at trace time for values that
``optax.inject_hyperparams`` traces. Concrete values are range-checked; a
traced value passes once its type and dtype are right, since its value is
not known when the step is traced (the engine's gate range-checks it in the
step). Messages name the argument in backticks, show the bad value and,
where one exists, the fix. Each value is checked once: a schedule is sampled
once, and its samples serve every check that reads its values. Warnings go
through :func:`optax_ema._warn.warn`, which points them at the user's line.

The flow is one way: the package calls in here, and nothing here calls back
up; these modules read the value types of the layers below
(:class:`~optax_ema._rules.PerLeafDecay`, ``which=`` of
:mod:`optax_ema._averages`, :class:`~optax_ema._storage.Storage`).

- :mod:`._numbers`: bools, strings, ints, reals and their dtypes.
- :mod:`._decays`: decays and schedules, ``average_decay``, ``debias``, the
  arguments of :mod:`optax_ema.schedules`.
- :mod:`._storage`: ``ema_dtype``, ``stochastic_rounding``, ``offload``
  (:func:`check_storage`), and the warnings of round-to-nearest storage.
- :mod:`._options`: ``mask``, ``update_every``, ``overwrite_every``.
- :mod:`._profiles`: power-profile widths, of power_ema and of posthoc.
- :mod:`._optimizer`: the optimizer a transform wraps.
- :mod:`._functions`: ``average_op``, ``diagnostics``, ``state_shardings``
  and the Flax helpers.
- :mod:`._compat`: the Keras and TFA edge.
- :mod:`._posthoc`: :mod:`optax_ema.posthoc`.

The factories call, in order: :func:`~optax_ema.moving_average`
:func:`check_average_decay`, :func:`check_bool`, :func:`check_int`,
:func:`check_mask`, :func:`check_update_every`, :func:`check_storage`,
:func:`check_debias`, :func:`check_overwrite`, :func:`checked_optimizer`;
:func:`~optax_ema.power_ema` :func:`check_sigma_rels`, :func:`check_mask`,
:func:`check_storage`, :func:`checked_optimizer`; :func:`~optax_ema.swa`
:func:`check_int`, :func:`check_storage`, :func:`checked_optimizer`.
"""

from optax_ema._validation._compat import check_assigned_learning_rate
from optax_ema._validation._compat import check_built_optimizer_kwargs
from optax_ema._validation._compat import check_clips
from optax_ema._validation._compat import check_config
from optax_ema._validation._compat import check_config_clash
from optax_ema._validation._compat import check_initializer
from optax_ema._validation._compat import check_keras_decay
from optax_ema._validation._compat import check_learning_rate
from optax_ema._validation._compat import check_loss
from optax_ema._validation._compat import check_lr_alias
from optax_ema._validation._compat import check_not_trainable
from optax_ema._validation._compat import split_grads_and_vars
from optax_ema._validation._compat import warn_learning_rate_decay
from optax_ema._validation._decays import SAMPLED_COUNTS
from optax_ema._validation._decays import AverageDecays
from optax_ema._validation._decays import DecayLeaf
from optax_ema._validation._decays import check_average_decay
from optax_ema._validation._decays import check_debias
from optax_ema._validation._decays import check_decay
from optax_ema._validation._decays import check_decay_bounds
from optax_ema._validation._decays import check_half_life_decay
from optax_ema._validation._decays import check_power_profile
from optax_ema._validation._decays import check_schedule
from optax_ema._validation._decays import sample_schedule
from optax_ema._validation._functions import check_diagnostics_args
from optax_ema._validation._functions import check_float_average
from optax_ema._validation._functions import check_nnx_optimizer
from optax_ema._validation._functions import check_state_shardings_args
from optax_ema._validation._functions import check_train_state
from optax_ema._validation._functions import checked_batches
from optax_ema._validation._numbers import check_bool
from optax_ema._validation._numbers import check_float_dtype
from optax_ema._validation._numbers import check_int
from optax_ema._validation._numbers import check_positive
from optax_ema._validation._numbers import check_real
from optax_ema._validation._numbers import check_str
from optax_ema._validation._numbers import check_unit
from optax_ema._validation._numbers import static_int
from optax_ema._validation._optimizer import check_transformation
from optax_ema._validation._optimizer import checked_optimizer
from optax_ema._validation._options import check_mask
from optax_ema._validation._options import check_overwrite
from optax_ema._validation._options import check_update_every
from optax_ema._validation._posthoc import check_directory
from optax_ema._validation._posthoc import check_evaluate
from optax_ema._validation._posthoc import check_every
from optax_ema._validation._posthoc import check_resume_from
from optax_ema._validation._posthoc import check_rows
from optax_ema._validation._posthoc import check_snapshot_dtype
from optax_ema._validation._posthoc import check_snapshot_run
from optax_ema._validation._posthoc import check_step
from optax_ema._validation._posthoc import check_sweep_key
from optax_ema._validation._profiles import check_sigma_rel
from optax_ema._validation._profiles import check_sigma_rels
from optax_ema._validation._profiles import check_sweep_widths
from optax_ema._validation._storage import RELATIVE_MOVE
from optax_ema._validation._storage import check_ema_dtype
from optax_ema._validation._storage import check_storage
from optax_ema._validation._storage import nearest_rounding_freezes
from optax_ema._validation._storage import warn_if_profiles_freeze
from optax_ema._validation._storage import warn_if_unresolvable

__all__ = [
  "RELATIVE_MOVE",
  "SAMPLED_COUNTS",
  "AverageDecays",
  "DecayLeaf",
  "check_assigned_learning_rate",
  "check_average_decay",
  "check_bool",
  "check_built_optimizer_kwargs",
  "check_clips",
  "check_config",
  "check_config_clash",
  "check_debias",
  "check_decay",
  "check_decay_bounds",
  "check_diagnostics_args",
  "check_directory",
  "check_ema_dtype",
  "check_evaluate",
  "check_every",
  "check_float_average",
  "check_float_dtype",
  "check_half_life_decay",
  "check_initializer",
  "check_int",
  "check_keras_decay",
  "check_learning_rate",
  "check_loss",
  "check_lr_alias",
  "check_mask",
  "check_nnx_optimizer",
  "check_not_trainable",
  "check_overwrite",
  "check_positive",
  "check_power_profile",
  "check_real",
  "check_resume_from",
  "check_rows",
  "check_schedule",
  "check_sigma_rel",
  "check_sigma_rels",
  "check_snapshot_dtype",
  "check_snapshot_run",
  "check_state_shardings_args",
  "check_step",
  "check_storage",
  "check_str",
  "check_sweep_key",
  "check_sweep_widths",
  "check_train_state",
  "check_transformation",
  "check_unit",
  "check_update_every",
  "checked_batches",
  "checked_optimizer",
  "nearest_rounding_freezes",
  "sample_schedule",
  "split_grads_and_vars",
  "static_int",
  "warn_if_profiles_freeze",
  "warn_if_unresolvable",
  "warn_learning_rate_decay",
]
