"""Storing an average in a narrower float dtype: round to nearest or stochastically.

A low-precision average (bfloat16, float16) computed in float32 is stored
either rounded to nearest, which freezes it once each step's change is
below half a place, or rounded up or down at random with the probability
that makes the result unbiased. The random bits are a hash of the step, the
leaf, the average and the element's global index: deterministic, and the
same on every device and under every sharding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash with good avalanche ("lowbias32", C. Wellons)."""
  x = x ^ (x >> jnp.uint32(16))
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> jnp.uint32(15))
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> jnp.uint32(16))


def rounding_bits(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
  """Pseudo-random uint32 per element: a hash of (seed, flat element index).

  The element index is global (``lax.iota`` over the whole array), so the
  bits, and hence the rounding, are the same on every device and under every
  sharding, and cost a few integer operations per element.
  """
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _mix32(index ^ _mix32(jnp.asarray(seed, jnp.uint32)))


def rounding_seed(count: jax.Array, leaf: int, average: int) -> jax.Array:
  """The per-step, per-leaf, per-average seed of :func:`rounding_bits`."""
  c = _mix32(jnp.asarray(count).astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
  salt = (leaf * 0x85EBCA6B + average * 0xC2B2AE35) & 0xFFFFFFFF
  return _mix32(c ^ jnp.uint32(salt))


def round_stochastic_bf16(x: jax.Array, bits: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` to bfloat16 up or down, unbiased, using ``bits``.

  bfloat16 is float32 with the low 16 bits dropped: adding a uniform 16-bit
  dither before truncating rounds away from zero with probability equal to
  the dropped fraction, so ``E[result] = x``. Infinities and NaNs pass through.
  """
  x = x.astype(jnp.float32)
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = bits.astype(jnp.uint32) & jnp.uint32(0xFFFF)
  rounded = (raw + noise) & jnp.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jnp.where(jnp.isfinite(x), out, x.astype(jnp.bfloat16))


def round_stochastic(x: jax.Array, dtype: jnp.dtype, bits: jax.Array) -> jax.Array:
  """Rounds ``x`` to the narrower float ``dtype`` up or down, unbiased.

  The two neighbours of ``x`` in ``dtype`` are found with ``nextafter``;
  the upper one is taken with probability ``(x - lo) / (hi - lo)``, from 24
  random bits. Values that round to an infinity (beyond the dtype's range),
  infinities and NaNs round to nearest.
  """
  if jnp.dtype(dtype) == jnp.bfloat16:
    return round_stochastic_bf16(x, bits)
  x = x.astype(jnp.float32)
  nearest = x.astype(dtype)
  below = nearest.astype(jnp.float32) > x
  lo = jnp.where(below, jnp.nextafter(nearest, jnp.asarray(-jnp.inf, dtype)), nearest)
  hi = jnp.nextafter(lo, jnp.asarray(jnp.inf, dtype))
  lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
  gap = jnp.where(hi32 > lo32, hi32 - lo32, 1.0)
  frac = (x - lo32) / gap
  u = (bits.astype(jnp.uint32) >> jnp.uint32(8)).astype(jnp.float32) * (2.0**-24)
  out = jnp.where(u < frac, hi, lo)
  return jnp.where(jnp.isfinite(nearest), out, nearest)


def store(
  exact: jax.Array, dtype: jnp.dtype, stochastic: bool, seed: jax.Array | None
) -> jax.Array:
  """``exact`` (the average in its compute dtype) in its storage ``dtype``."""
  dtype = jnp.dtype(dtype)
  narrower = jnp.finfo(dtype).bits < jnp.finfo(exact.dtype).bits
  if stochastic and narrower and not jnp.issubdtype(dtype, jnp.complexfloating):
    assert seed is not None
    return round_stochastic(exact, dtype, rounding_bits(exact.shape, seed))
  return exact.astype(dtype)
