"""The restricted unpickler: published-format files load, pickles that name code do not.

Published-format files are written here as 2021 code wrote them: a dict of
NumPy arrays through pickle and dill, Haiku's FlatMapping and JAX's device
arrays through `__reduce__` methods that name their 2021 class paths (stand-in
classes registered under those paths only while writing, so loading must go
through safe_pickle's own mapping). Every hostile payload is first shown to be
live (plain unpickling creates its sentinel file), then refused with the
sentinel absent.
"""

import contextlib
import importlib
import os
import pickle
import subprocess
import sys
import time
import types

import dill
import numpy as np
import pytest

from nfnets_jax import weights
from nfnets_jax.weights import safe_pickle


def _tree():
  return {
      "NFNet/~/stem_conv0": {"w": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3),
                             "b": np.linspace(-1, 1, 3, dtype=np.float32)},
      "NFNet/~/nf_block/~/skip_gain": {"skip_gain": np.array(0.25, np.float32)},
      "NFNet/~/linear": {"w": np.asfortranarray(np.ones((4, 5), np.float64)),
                         "b": np.zeros((0,), np.int32)},
  }


def _assert_same_tree(actual, expected):
  assert isinstance(actual, dict) and sorted(actual) == sorted(expected)
  for module, group in expected.items():
    assert isinstance(actual[module], dict) and sorted(actual[module]) == sorted(group), module
    for name, value in group.items():
      got = actual[module][name]
      assert type(got) is np.ndarray, (module, name, type(got))
      assert got.dtype == value.dtype and got.shape == value.shape, (module, name)
      assert got.tobytes() == value.tobytes(), (module, name)


@contextlib.contextmanager
def _registered(module_name, cls):
  """Makes `cls` importable as `module_name.<cls.__name__>` while a pickle is written.

  The real module (or, where today's library lacks it, its package) is imported
  first: pickle imports the top-level package, which must not meet the stand-in.
  """
  try:
    importlib.import_module(module_name)
  except ImportError:
    importlib.import_module(module_name.rpartition(".")[0])
  parent, _, child = module_name.rpartition(".")
  package = sys.modules[parent]
  saved = sys.modules.get(module_name), getattr(package, child, None)
  stand_in = types.ModuleType(module_name)
  setattr(stand_in, cls.__name__, cls)
  cls.__module__, cls.__qualname__ = module_name, cls.__name__
  # pickle finds a module in sys.modules, dill as an attribute of its package.
  sys.modules[module_name] = stand_in
  setattr(package, child, stand_in)
  try:
    yield
  finally:
    if saved[0] is None:
      del sys.modules[module_name]
    else:
      sys.modules[module_name] = saved[0]
    if saved[1] is None:
      delattr(package, child)
    else:
      setattr(package, child, saved[1])


# ----------------------------------------------------------------------------- what loads


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickle_of_arrays_loads_identically(protocol):
  tree = _tree()
  _assert_same_tree(safe_pickle.loads(pickle.dumps(tree, protocol=protocol)), tree)


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_dill_pickle_of_arrays_loads_identically(protocol):
  tree = _tree()
  data = dill.dumps(tree, protocol=protocol)
  assert b"_create_array" in data  # dill's own array builder, mapped by safe_pickle.
  _assert_same_tree(safe_pickle.loads(data), tree)


def test_numpy_scalars_load():
  data = pickle.dumps({"m": {"s": np.float32(1.5), "i": np.int64(-3)}})
  loaded = safe_pickle.loads(data)["m"]
  assert loaded["s"] == np.float32(1.5) and loaded["s"].dtype == np.float32
  assert loaded["i"] == -3 and loaded["i"].dtype == np.int64


def _flat_mapping_class():
  """Haiku 2021's FlatMapping as its pickles see it: `__reduce__` is (FlatMapping, (dict,))."""

  class FlatMapping:
    def __init__(self, mapping):
      self._mapping = dict(mapping)

    def __reduce__(self):
      return FlatMapping, (self._mapping,)

  return FlatMapping


def _device_array_class(name, *, named):
  """A 2021 JAX device array: `__reduce__` forwarded to the NumPy value's (named=False),
  or, for files that do name the class, a call of the class with the value (named=True)."""

  def reduce(self):
    return (type(self), (self._value,)) if named else self._value.__reduce__()

  return type(name, (), {"__init__": lambda self, value: setattr(self, "_value", value),
                         "__reduce__": reduce})


@pytest.mark.parametrize("dumps", [pickle.dumps, dill.dumps], ids=["pickle", "dill"])
@pytest.mark.parametrize("module_name,class_name", [
    ("jax.interpreters.xla", "_DeviceArray"),
    ("jax.interpreters.xla", "DeviceArray"),
    ("jax._src.device_array", "_DeviceArray"),
    ("jaxlib.xla_extension", "DeviceArray"),
    ("jax.interpreters.pxla", "ShardedDeviceArray"),
])
def test_haiku_flat_mapping_of_device_arrays_loads_as_dicts_of_arrays(dumps, module_name,
                                                                     class_name):
  tree = _tree()
  flat_mapping = _flat_mapping_class()
  forwarding = _device_array_class(class_name, named=False)
  naming = _device_array_class(class_name, named=True)
  with _registered("haiku._src.data_structures", flat_mapping), \
       _registered(module_name, naming):
    # 2021 layout: an outer FlatMapping of inner FlatMappings (or dicts) of device arrays.
    written = flat_mapping({
        module: (flat_mapping if i % 2 else dict)(
            {name: (naming if j % 2 else forwarding)(value)
             for j, (name, value) in enumerate(group.items())})
        for i, (module, group) in enumerate(tree.items())})
    data = dumps(written)
  assert b"haiku._src.data_structures" in data and class_name.encode() in data
  assert sys.modules.get("haiku._src.data_structures") is not None  # The real one is back.
  _assert_same_tree(safe_pickle.loads(data), tree)


def test_frozendict_and_todays_jax_arrays_load():
  import jax.numpy as jnp

  class frozendict:  # pylint: disable=invalid-name
    def __init__(self, storage):
      self._storage = dict(storage)

    def __reduce__(self):
      return frozendict, (self._storage,)

  with _registered("haiku._src.data_structures", frozendict):
    data = pickle.dumps(frozendict({"m": frozendict({"w": jnp.arange(3.0)})}))
  assert b"jax._src.array" in data and b"frozendict" in data
  loaded = safe_pickle.loads(data)
  assert type(loaded["m"]["w"]) is np.ndarray
  np.testing.assert_array_equal(loaded["m"]["w"], np.arange(3.0, dtype=np.float32))


def test_published_format_file_loads_through_load_params(tmp_path):
  tree = _tree()
  flat_mapping = _flat_mapping_class()
  with _registered("haiku._src.data_structures", flat_mapping):
    path = tmp_path / "F0_haiku.npz"
    path.write_bytes(dill.dumps(flat_mapping({m: flat_mapping(g) for m, g in tree.items()})))
  _assert_same_tree(weights.load_params(path), tree)


# ----------------------------------------------------------------------------- what is refused


class _Reduce:
  """Pickles as `func(*args)`: what a hostile file runs while it is being loaded."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _os_system(sentinel):
  return pickle.dumps(_Reduce(os.system, f"touch {sentinel}")), "system"


def _eval(sentinel):
  return pickle.dumps(_Reduce(eval, f"open({str(sentinel)!r}, 'w').close()")), "builtins.eval"


def _subprocess_call(sentinel):
  return pickle.dumps(_Reduce(subprocess.call, ["touch", str(sentinel)])), "subprocess.call"


def _subprocess_popen(sentinel):
  return pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(sentinel)])), "subprocess.Popen"


def _dill_function(sentinel):
  write = lambda: open(sentinel, "w").close()  # noqa: E731  (pickled by value by dill)
  return dill.dumps(_Reduce(write)), "dill._dill._create_function"


def _dill_code_object(sentinel):
  code = compile(f"open({str(sentinel)!r}, 'w').close()", "<payload>", "exec")
  # The code object comes first, so it is the first thing the unpickler meets.
  return dill.dumps((code, _Reduce(exec, code))), "dill._dill._create_code"


def _numpy_save(sentinel):
  return pickle.dumps(_Reduce(np.save, str(sentinel), np.zeros(1))), "numpy.save"


def _numpy_runstring(sentinel):
  from numpy.testing._private.utils import runstring
  return (pickle.dumps(_Reduce(runstring, f"open({str(sentinel)!r}, 'w').close()", {})),
          "numpy.testing._private.utils.runstring")


def _nested_in_valid_tree(sentinel):
  tree = _tree()
  tree["NFNet/~/linear"]["b"] = _Reduce(os.system, f"touch {sentinel}")
  return dill.dumps(tree), "system"


PAYLOADS = [_os_system, _eval, _subprocess_call, _subprocess_popen, _dill_function,
            _dill_code_object, _numpy_save, _numpy_runstring, _nested_in_valid_tree]


def _wait_for(path, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not path.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
  return path.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__.strip("_"))
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, payload):
  sentinel = tmp_path / "sentinel.npy"  # .npy so that numpy.save writes exactly this name.
  data, refused_name = payload(sentinel)

  # The payload is live: plain unpickling creates the sentinel.
  result = dill.loads(data)
  if isinstance(result, subprocess.Popen):
    result.wait()
  assert _wait_for(sentinel), "the payload should create the sentinel under plain unpickling"
  sentinel.unlink()

  with pytest.raises(safe_pickle.UntrustedPickleError) as err:
    safe_pickle.loads(data, source="payload.pkl")
  message = str(err.value)
  assert refused_name in message, message
  assert message.startswith("payload.pkl: refused to unpickle ")
  assert "not a plain parameter file" in message and "trust_pickle=True" in message

  path = tmp_path / "payload.pkl"
  path.write_bytes(data)
  with pytest.raises(weights.UntrustedPickleError, match=refused_name):
    weights.load_params(path)
  time.sleep(0.2)  # A process the payload might have started would have written by now.
  assert not sentinel.exists()


def test_dill_type_loader_accepts_bytes_only():
  with pytest.raises(safe_pickle.UntrustedPickleError, match=r"_load_type\('CodeType'\)"):
    safe_pickle.loads(dill.dumps(types.CodeType))
  assert safe_pickle.loads(dill.dumps(np.zeros((0, 2)), protocol=2)).shape == (0, 2)


def test_object_arrays_are_refused():
  data = pickle.dumps({"m": {"w": np.array([1, "one"], dtype=object)}})
  with pytest.raises(ValueError, match=r"/m/w is an array of Python objects"):
    safe_pickle.loads(data)


def test_truncated_pickle_says_so():
  data = pickle.dumps(_tree())
  with pytest.raises(ValueError, match="not a readable parameter pickle"):
    safe_pickle.loads(data[:len(data) // 2])
