"""What an average moves towards, and in which dtypes.

The value an averaging step takes for each leaf is ``params + updates`` as
``optax.apply_updates`` forms it (or the params before the update), in the
leaf's own dtype; the average holds it in its accumulator dtype and computes
in at least float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_ema import _tree_utils


def default_ema_dtype(leaf_dtype: Any, ema_dtype: Any) -> Any:
  """The accumulator dtype of a floating point leaf.

  float16 and bfloat16 leaves accumulate in float32 unless ``ema_dtype`` says
  otherwise; other real floats keep their dtype; complex leaves always keep
  theirs (an explicit real ``ema_dtype`` would drop the imaginary part).
  """
  leaf_dtype = jnp.dtype(leaf_dtype)
  if jnp.issubdtype(leaf_dtype, jnp.complexfloating):
    return leaf_dtype
  if ema_dtype is not None:
    return jnp.dtype(ema_dtype)
  if leaf_dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return leaf_dtype


def upcast_value(value: Any, compute: Any) -> jax.Array:
  """``value`` in the ``compute`` dtype, holding exactly its own dtype's values.

  A float16/bfloat16 ``value`` (e.g. ``params + updates`` as
  ``optax.apply_updates`` rounds it) is re-rounded to its own grid after the
  upcast with ``lax.reduce_precision``: under ``jit`` XLA may otherwise fuse
  the low-precision arithmetic into float32 and skip the rounding (excess
  precision), and the average would see values training never held.
  """
  value = jnp.asarray(value)
  out = value.astype(compute)
  if (
    jnp.issubdtype(value.dtype, jnp.floating)
    and jnp.issubdtype(jnp.dtype(compute), jnp.floating)
    and jnp.finfo(value.dtype).bits < jnp.finfo(compute).bits
  ):
    info = jnp.finfo(value.dtype)
    out = jax.lax.reduce_precision(
      out, exponent_bits=info.nexp, mantissa_bits=info.nmant
    )
  return out


def _latest_value(p: Any, u: Any) -> Any:
  """What ``optax.apply_updates`` makes of one leaf; keys and float0 stay put."""
  if u is None or _tree_utils.is_key(p):
    return p
  if getattr(u, "dtype", None) == jax.dtypes.float0:
    return p
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def latest_values(reference: Any, params: Any, updates: Any, sequential: bool) -> Any:
  """The values the averages move towards, leaf by leaf (``None`` where unused).

  ``params + updates`` as ``optax.apply_updates`` forms them (``sequential``)
  or ``params``; ``None`` where ``reference`` holds no average.
  """

  def leaf(a: Any, p: Any, u: Any) -> Any:
    if _tree_utils.is_none_or_masked(a):
      return None
    return _latest_value(p, u) if sequential else p

  return jax.tree.map(
    leaf, reference, params, updates, is_leaf=_tree_utils.is_none_or_masked
  )


def all_finite(tree: Any) -> jax.Array:
  """A scalar bool: every floating point leaf of ``tree`` is finite."""
  flags = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree, is_leaf=_tree_utils.is_none_or_masked)
    if not _tree_utils.is_none_or_masked(x) and _tree_utils.is_float(x)
  ]
  if not flags:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(flags))
