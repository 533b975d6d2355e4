"""Unpickling parameter files without running the code they name.

A pickle is a small program: every class or function it names (a "global")
is imported and called while loading. The published NFNet weights
(`F0_haiku.npz` ... `F6_haiku.npz`) are dill pickles of a 2021 Haiku parameter
mapping `{module: {name: array}}`, so a plain `pickle.load` of a file from an
untrusted mirror could run anything. `load`/`loads` read such files with an
unpickler whose `find_class` hands out only the few callables a parameter file
needs, each replaced by a function of this module that can build nothing but a
dict or a NumPy array. Any other global is refused before it is imported, with
`UntrustedPickleError` naming it.

What is accepted, and why (the 2021 writers' own `__reduce__` methods):

* NumPy arrays, dtypes and scalars: `ndarray.__reduce__` names
  `numpy.core.multiarray._reconstruct` (NumPy 1.x; `numpy._core.multiarray`
  since NumPy 2), `numpy.ndarray` and `numpy.dtype`, then sets the array's
  state (shape, dtype, raw bytes); protocol 5 names `numpy.core.numeric._frombuffer`
  (`numpy._core.numeric` since 2); NumPy scalars name `...multiarray.scalar`.
  Protocols 0-2 store bytes as `_codecs.encode(text, 'latin1')`, or `bytes()`
  when empty.
* dill: a NumPy array is written as `dill._dill._create_array(f, args, state,
  npdict)` (`dill.dill` before dill 0.3), i.e. `f(*args)` then `__setstate__(state)`.
  and, for an empty array under protocol 2, `_load_type('bytes')`. Nothing else
  of dill is accepted: a dict of arrays needs no other dill global, and dill's
  function, code and type builders are exactly how it pickles code.
* Haiku's `haiku._src.data_structures.FlatMapping` (the parameter container of
  2020-2022) pickles as `FlatMapping(plain_mapping)`; its predecessor
  `frozendict` as `frozendict(storage_dict)`. Both become a `dict` here.
* JAX device arrays (`jax.interpreters.xla._DeviceArray`/`DeviceArray`,
  `jax._src.device_array.*`, jaxlib's C++ `jaxlib.xla_extension.DeviceArray`,
  the `ShardedDeviceArray` variants): their `__reduce__` forwarded to the host
  NumPy value's, so they are stored as plain NumPy arrays and their class names
  do not normally appear; where one is named it is called with the array, and
  yields that array. Today's `jax.Array` pickles as
  `jax._src.array._reconstruct_array(f, args, array_state, aval_state)`, read
  like dill's `_create_array`.

After loading, every array must be numeric: an object array (whose elements a
pickle could fill with anything) is refused too.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO, Callable

import numpy as np

#: What the refusal message says a parameter file may hold.
_HOLDS = "a parameter file holds only dicts and NumPy arrays"


class UntrustedPickleError(ValueError):
  """A pickle names a global (class or function) that a parameter file never needs.

  `module` and `name` are the refused global, e.g. `'os'`, `'system'`. The
  global was neither imported nor called.
  """

  def __init__(self, module: str, name: str, source: str = "the pickle"):
    self.module = module
    self.name = name
    super().__init__(
        f"{source}: refused to unpickle {module}.{name}: {_HOLDS} (and Haiku's and JAX's "
        "2021 containers of them), so this is not a plain parameter file. Loading it would "
        "run code the file names; pass trust_pickle=True (--trust_pickle) only if you trust "
        "the file and where it came from.")


# ----------------------------------------------------------------------------- builders


def _reconstruct_ndarray(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  """NumPy's `_reconstruct`: an empty array whose state the pickle sets next (BUILD)."""
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(
        f"array reconstruction asked for subtype {subtype!r}; only numpy.ndarray is accepted.")
  return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
  """A NumPy scalar from its dtype and raw bytes (what `np.float32(1).__reduce__` names)."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError(f"NumPy scalar of dtype {dtype!r}: only numeric scalars are "
                                 "accepted in a parameter file.")
  return _NUMPY_SCALAR(dtype, data)


def _numpy_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  """NumPy's protocol-5 array builder: an array over out-of-band or inline bytes."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError(f"array of dtype {dtype!r}: only numeric arrays are accepted "
                                 "in a parameter file.")
  return _NUMPY_FROMBUFFER(buffer, dtype, shape, order)


def _latin1_bytes(text: Any, encoding: str = "utf-8") -> bytes:
  """`_codecs.encode` as protocol 2 uses it for bytes: a str encoded as latin-1, nothing else."""
  if not isinstance(text, str) or encoding != "latin1":
    raise pickle.UnpicklingError(
        f"_codecs.encode({type(text).__name__}, {encoding!r}): only the latin1 encoding of a "
        "str, which protocol 2 uses to store bytes, is accepted.")
  return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
  """`bytes()` as protocols 0-2 store an empty byte string (a zero-size array's data)."""
  if args:
    raise pickle.UnpicklingError(f"bytes{args!r}: only bytes() with no arguments is accepted.")
  return b""


def _dill_builtin_type(name: Any) -> Callable[..., Any]:
  """dill's `_load_type(name)`, which it writes for a builtin type; only `bytes` is accepted.

  dill names `bytes` this way when protocol 2 stores an empty byte string (a
  zero-size array's data); every other type it can name (functions, code,
  modules...) is how dill pickles code, and is refused.
  """
  if name != "bytes":
    raise UntrustedPickleError("dill._dill", f"_load_type({name!r})")
  return _empty_bytes


def _array_with_state(f: Any, args: Any, state: Any, extra: Any = None) -> np.ndarray:
  """dill's `_create_array` and jax's `_reconstruct_array`: `f(*args)`, then its state.

  `f` must be NumPy's array reconstruction (as accepted above); `extra` is
  dill's instance `__dict__` (None for an ndarray) or JAX's abstract-value
  state (a dict such as `{'weak_type': False}`), neither of which a parameter
  needs.
  """
  if f not in (_reconstruct_ndarray, _numpy_frombuffer):
    raise pickle.UnpicklingError(f"array builder {f!r} is not NumPy's array reconstruction.")
  if extra is not None and not isinstance(extra, dict):
    raise pickle.UnpicklingError(f"array extra state {type(extra).__name__} is not a dict.")
  array = f(*args)
  if state is not None:
    array.__setstate__(state)
  return array


def _device_array(value: Any) -> np.ndarray:
  """A 2021 JAX device array named by class: the NumPy value it was built from."""
  if not isinstance(value, np.ndarray):
    raise pickle.UnpicklingError(
        f"device array built from a {type(value).__name__}; only a NumPy array is accepted.")
  return value


def _mapping(*args: Any, **kwargs: Any) -> dict:
  """Haiku's FlatMapping/frozendict (and OrderedDict): the same items as a plain dict."""
  return dict(*args, **kwargs)


# NumPy's own builders, taken from what NumPy's pickling names today (so neither
# `numpy.core` nor `numpy._core` has to be imported by name).
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_SCALAR = np.float32(0).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _allowed() -> dict[tuple[str, str], Callable[..., Any]]:
  """(module, name) -> the callable `find_class` returns for it; everything else is refused."""
  allowed: dict[tuple[str, str], Callable[..., Any]] = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("_codecs", "encode"): _latin1_bytes,
      ("builtins", "bytes"): _empty_bytes,
      ("__builtin__", "bytes"): _empty_bytes,  # Protocols 0-2 spell builtins the Python 2 way.
      ("collections", "OrderedDict"): _mapping,
      ("jax._src.array", "_reconstruct_array"): _array_with_state,
  }
  for core in ("numpy.core", "numpy._core"):
    allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct_ndarray
    allowed[(f"{core}.multiarray", "scalar")] = _numpy_scalar
    allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_frombuffer
  for dill_module in ("dill._dill", "dill.dill"):
    allowed[(dill_module, "_create_array")] = _array_with_state
    allowed[(dill_module, "_load_type")] = _dill_builtin_type
  for name in ("FlatMapping", "FlatMap", "frozendict"):
    allowed[("haiku._src.data_structures", name)] = _mapping
  for module in ("jax.interpreters.xla", "jax._src.device_array", "jaxlib.xla_extension"):
    for name in ("DeviceArray", "_DeviceArray"):
      allowed[(module, name)] = _device_array
  for module in ("jax.interpreters.pxla", "jaxlib.xla_extension.pmap_lib"):
    for name in ("ShardedDeviceArray", "_ShardedDeviceArray"):
      allowed[(module, name)] = _device_array
  return allowed


ALLOWED_GLOBALS = _allowed()


# ----------------------------------------------------------------------------- loading


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` returns only `ALLOWED_GLOBALS`' builders.

  Refusal happens at the first global that is not in the table, before
  anything is imported, so a hostile file stops with nothing run.
  """

  def __init__(self, file: BinaryIO, source: str = "the pickle"):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    # The audit event Python's own find_class raises, so audit hooks see this unpickler too.
    sys.audit("pickle.find_class", module, name)
    builder = ALLOWED_GLOBALS.get((module, name))
    if builder is None:
      raise UntrustedPickleError(module, name, self._source)
    return builder

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError(f"{self._source}: persistent id {pid!r} refused; {_HOLDS}.")


def load(file: BinaryIO, source: str = "the pickle") -> Any:
  """Unpickles a parameter file from `file` without running code; see the module docstring.

  Raises:
    UntrustedPickleError: the file names a global outside `ALLOWED_GLOBALS`.
    ValueError: the file holds an object array, or is not a readable pickle.
  """
  try:
    tree = RestrictedUnpickler(file, source).load()
  except UntrustedPickleError as e:  # Raised by find_class or a builder: name the file.
    raise UntrustedPickleError(e.module, e.name, source) from None
  except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
    raise ValueError(f"{source} is not a readable parameter pickle: {e}") from e
  _check_numeric(tree, source)
  return tree


def loads(data: bytes, source: str = "the pickle") -> Any:
  """`load` from bytes."""
  return load(io.BytesIO(data), source)


def _check_numeric(tree: Any, source: str, path: str = "") -> None:
  """Refuses object arrays anywhere in the loaded containers."""
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      _check_numeric(value, source, f"{path}/{key}")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      _check_numeric(value, source, f"{path}[{i}]")
  elif isinstance(tree, (np.ndarray, np.generic)) and tree.dtype.hasobject:
    raise ValueError(f"{source}: {path or 'the top level'} is an array of Python objects "
                     f"(dtype {tree.dtype}); {_HOLDS} of numbers.")
