"""A checksum of every saved array, recorded with its step and checked when it is read back.

Orbax notices a truncated or missing file, but not bytes changed in place (bit
rot, a bad disk or copy): those arrays restore with wrong values, NaN weights
that the tools would score and the trainer would resume from. So the trainer
records, in each step's `meta` item, a checksum of every array of its trees
(`CHECKSUMS_KEY`: item -> array path -> 16 hex digits), and every reader
compares: a mismatch is a `ChecksumMismatchError` naming the arrays, which
makes the step a damaged one (the trainer sets it aside and restores the
previous step; the tools stop with the damaged-checkpoint line and `--step`).

The checksum is a function of an array's values, their positions, its shape and
dtype only: the sum, modulo 2^64 (two 32-bit lanes), of a mixing hash
(MurmurHash3's finalizer) of each 32-bit word and its index, seeded by the
shape and dtype. Integer sums do not depend on
order, so the value is the same whether the array is whole on one host or
split over any number of devices and processes (the trainer computes it where
the arrays are, without gathering them); any change of a single bit changes it.
A checksum detects accidents, not tampering.
"""

import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

#: The `meta` item's key holding the checksums: {item: {array path: hex}}.
CHECKSUMS_KEY = "checksums"
#: Arrays named in a mismatch error; the rest are counted.
NAMED_IN_ERROR = 5


class ChecksumMismatchError(ValueError):
  """Arrays read back differ from what was saved (the message names them)."""


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words: one per element of up to 32 bits, two (a trailing
  axis) for 64-bit and complex elements."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  words = jax.lax.bitcast_convert_type(x, bits)  # 8-byte elements: a trailing axis of 2
  return words.astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major index (modulo 2^32), built from per-axis iotas so a split
  array needs no reshape (nor any communication)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
        stride % 2 ** 32)
    stride *= shape[axis]
  return index


def _array_checksum(x: jax.Array) -> jax.Array:
  """uint32[2]: the two lanes of one array's checksum (its shape and dtype, static here,
  seed the mixing: the same values in another shape or type sum differently)."""
  words = _words(x)
  seed = jnp.uint32(zlib.crc32(f"{x.shape} {x.dtype.name}".encode()))
  mixed = _fmix32(words ^ _fmix32(_positions(words.shape) * jnp.uint32(0x9E3779B9) + seed))
  return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32),
                    jnp.sum(_fmix32(mixed ^ jnp.uint32(0x165667B1)), dtype=jnp.uint32)])


# One program for every array of a tree: a launch per array would put hundreds of small
# programs in flight, whose cross-device sums XLA:CPU's host devices can deadlock on.
_checksums_program = jax.jit(lambda leaves: [_array_checksum(x) for x in leaves])


def _host_fmix32(h: np.ndarray) -> np.ndarray:
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _host_words(x: np.ndarray) -> np.ndarray:
  """`_words` in NumPy."""
  if np.iscomplexobj(x):
    return _host_words(np.stack([x.real, x.imag], axis=-1))
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
  words = np.ascontiguousarray(x).view(bits)
  if x.dtype.itemsize == 8:  # as bitcast_convert_type: a trailing axis of the two halves
    words = words.reshape(x.shape + (2,))
  return words.astype(np.uint32)


def _host_array_checksum(x: np.ndarray) -> np.ndarray:
  """`_array_checksum` in NumPy (uint32 arithmetic wraps alike), for arrays already on
  the host: no compilation, which would cost the tools seconds for one read."""
  words = _host_words(x)
  seed = np.uint32(zlib.crc32(f"{x.shape} {x.dtype.name}".encode()))
  with np.errstate(over="ignore"):
    positions = np.arange(words.size, dtype=np.uint32).reshape(words.shape)
    mixed = _host_fmix32(words ^ _host_fmix32(positions * np.uint32(0x9E3779B9) + seed))
    return np.array([np.sum(mixed, dtype=np.uint32),
                     np.sum(_host_fmix32(mixed ^ np.uint32(0x165667B1)), dtype=np.uint32)])


def tree_checksums(tree: Any) -> dict[str, str]:
  """{array path (`jax.tree_util.keystr`): 16 hex digits} of every array of `tree`.

  Arrays may be NumPy arrays (checksummed on the host) or JAX arrays of any
  sharding (checksummed where they are, in one program; every process of a job
  calls this with its global arrays, as for any other computation on them).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  leaves = [leaf for _, leaf in flat]
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    sums = [_host_array_checksum(leaf) for leaf in leaves]
  else:
    sums = jax.device_get(_checksums_program(leaves))
  return {jax.tree_util.keystr(path): "".join(f"{int(lane):08x}" for lane in np.asarray(value))
          for (path, _), value in zip(flat, sums)}


def item_checksums(items: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  """`tree_checksums` of each tree of `items` (computed together: one program), by item."""
  flat = tree_checksums(dict(items))
  return {item: {key[len(f"[{item!r}]"):]: value for key, value in flat.items()
                 if key.startswith(f"[{item!r}]")} for item in items}


def verify(computed: Mapping[str, str], recorded: Mapping[str, str], what: str) -> None:
  """Raises `ChecksumMismatchError` unless every array `recorded` is `computed` (from
  `tree_checksums` of what was read) with that checksum; `what` names the tree."""
  wrong = [key for key, value in recorded.items() if computed.get(key) != value]
  if not wrong:
    return
  named = ", ".join(wrong[:NAMED_IN_ERROR]) + (
      f" and {len(wrong) - NAMED_IN_ERROR} more" if len(wrong) > NAMED_IN_ERROR else "")
  raise ChecksumMismatchError(
      f"{len(wrong)} of the {len(recorded)} arrays of {what} differ from the checksums "
      f"recorded when it was saved ({named}): its files were changed since (bit rot, a bad "
      "disk or copy)")
