"""Parameter files: this project's safe `.npz`, published pickles, orbax trees.

Each reader returns `{module_path: {name: np.ndarray}}`, the tree the models'
`apply` takes; files are recognised by their first bytes, never their suffix.

* **this project's safe `.npz`** (`save_params_npz`): one array per parameter
  under the flat key `"<module_path>/<name>"`, e.g.
  `"NFNet/~/nf_block_3/~/conv1/w"`. It is read with `allow_pickle=False`, so
  opening it can never run code. Module paths contain `/~/`, so a key is split
  on its *last* `/`.
* **the published DeepMind files** (`F0_haiku.npz` ... `F6_haiku.npz`): despite
  the suffix these are dill pickles of the nested dict, read with
  `safe_pickle`, which rebuilds only dicts and NumPy arrays and refuses any
  other class or function by name, unrun (`UntrustedPickleError`);
  `trust_pickle=True` reads other pickles with full dill, running their code.
* **an orbax checkpoint directory** holding just a params tree
  (`save_params_orbax`, or any `StandardCheckpointer`/`PyTreeCheckpointer` save),
  restored onto this host's CPU.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import struct
import tempfile
from typing import Any, Mapping, Union

import numpy as np

from nfnets_jax.weights import read_failures, safe_pickle

Params = dict[str, dict[str, np.ndarray]]
PathLike = Union[str, os.PathLike]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTO = b"\x80"
# Files orbax writes at the top of a checkpoint directory (any of them suffices).
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")

#: A pickle names a class or function that a parameter file never holds (the error
#: names it); raised, with nothing run, when loading without `trust_pickle=True`.
UntrustedPickleError = safe_pickle.UntrustedPickleError


# ----------------------------------------------------------------------------- saving


def save_params_npz(params: Mapping[str, Mapping[str, Any]], path: PathLike, *,
                    overwrite: bool = True) -> pathlib.Path:
  """Writes `params` as this project's safe `.npz` (no pickles inside).

  Keys are `"<module_path>/<name>"`. Arrays are stored with their own dtype;
  bfloat16 (which `.npz` cannot describe, so it would come back as raw bytes)
  is widened to float32, which is exact. The file is written beside its
  destination and renamed into place, so a crash never leaves half a
  checkpoint under the final name.
  """
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    raise ValueError(f"save_params_npz writes .npz files; got {str(path)!r}. Use a path ending "
                     "in .npz (numpy would otherwise append the suffix behind your back).")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  flat = flatten_params(params)
  arrays = {}
  for key, value in flat.items():
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
      array = array.astype(np.float32)
    if array.dtype.kind not in "biuf":
      raise ValueError(f"Parameter {key!r} has dtype {array.dtype}; only numeric arrays can be "
                       "saved without pickling.")
    arrays[key] = array
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def save_params_orbax(params: Mapping[str, Mapping[str, Any]], path: PathLike, *,
                      overwrite: bool = False) -> pathlib.Path:
  """Saves `params` as a standalone orbax checkpoint directory (StandardCheckpointer).

  Orbax wants absolute paths; relative ones are resolved against the working
  directory. The call returns once the checkpoint is committed.
  """
  import orbax.checkpoint as ocp  # Lazy: orbax pulls in a lot, most users never need it.

  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  tree = {module: {name: np.asarray(value) for name, value in group.items()}
          for module, group in params.items()}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=overwrite)
    checkpointer.wait_until_finished()
  return path


# ----------------------------------------------------------------------------- reading


def load_file(path: pathlib.Path, *, trust_pickle: bool) -> Params:
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(_ZIP_MAGIC):
    return _load_npz(path)
  if head.startswith(_PICKLE_PROTO):
    return _load_pickle(path, trust_pickle=trust_pickle)
  if _looks_like_safetensors(path, head):
    raise ValueError(
        f"{str(path)!r} is a safetensors file, i.e. a PyTorch-layout state dict (e.g. timm's); "
        "convert it to this project's format with `python -m nfnets_jax.convert "
        f"--from_timm={path} --out={path.with_suffix('.npz')}`.")
  raise ValueError(
      f"Cannot tell what {str(path)!r} is (first bytes {head[:8]!r}): expected this project's "
      ".npz (a zip archive), a published *_haiku.npz (a pickle), an orbax directory or a "
      "training workdir.")


def _looks_like_safetensors(path: pathlib.Path, head: bytes) -> bool:
  if len(head) < 9:
    return False
  (header_len,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 8 + header_len <= path.stat().st_size


def _load_npz(path: pathlib.Path) -> Params:
  try:
    with np.load(path, allow_pickle=False) as data:
      # np.load hands back the raw bytes of zip members that are not .npy arrays
      # (a PyTorch .pth is a zip too), so check what the archive holds first.
      others = [name for name in data.zip.namelist() if not name.endswith(".npy")]
      if others:
        if any(name.endswith("data.pkl") for name in others):
          raise ValueError(
              f"{str(path)!r} is a PyTorch checkpoint (a zip with a pickled state dict); convert "
              f"a timm NFNet's weights with `python -m nfnets_jax.convert --from_timm={path} "
              f"--out={path.with_suffix('.npz')}`.")
        raise ValueError(f"{str(path)!r} is a zip archive but not a numpy .npz: it holds "
                         f"non-array members such as {others[0]!r}.")
      flat = {key: data[key] for key in data.files}
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise ValueError(
          f"{str(path)!r} stores pickled objects inside its .npz; this project's format holds "
          "plain numeric arrays only, and pickles are never loaded from a .npz.") from e
    raise
  return unflatten_params(flat, source=str(path))


def _load_pickle(path: pathlib.Path, *, trust_pickle: bool) -> Params:
  """A pickled parameter tree: restricted unpickling unless `trust_pickle` (then full dill)."""
  if not trust_pickle:
    with open(path, "rb") as f:
      tree = safe_pickle.load(f, source=repr(str(path)))
    return _as_params(tree, source=str(path))
  try:
    import dill  # The published files were written with dill; it reads plain pickles too.
    loader = dill.load
  except ImportError:  # dill only adds types these files do not use.
    loader = pickle.load
  try:
    with open(path, "rb") as f:
      tree = loader(f)
  except (ImportError, AttributeError) as e:
    raise ValueError(
        f"Unpickling {str(path)!r} needs a class this environment lacks ({e}); it was written "
        "by other software than the published parameter files.") from e
  return _as_params(tree, source=str(path))


def _as_params(tree: Any, source: str) -> Params:
  """Normalises an unpickled `{module: {name: array}}` mapping to NumPy arrays."""
  if not isinstance(tree, Mapping) and not hasattr(tree, "items"):
    raise ValueError(f"{source} holds a {type(tree).__name__}, not a {{module: {{name: array}}}} "
                     "parameter tree.")
  params: Params = {}
  for module, group in tree.items():
    if not isinstance(module, str) or not hasattr(group, "items"):
      raise ValueError(f"{source}: entry {module!r} is not a module of named arrays "
                       f"(got {type(group).__name__}); expected {{module: {{name: array}}}}.")
    params[module] = {str(name): np.asarray(value) for name, value in group.items()}
  return params


def is_orbax_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any((path / marker).exists() for marker in ORBAX_MARKERS)


def _cpu_target(item_dir: pathlib.Path):
  """Restore target: saved shapes and dtypes, placed on this host's CPU.

  Without one, orbax reuses the shardings recorded at save time, which name
  devices (TPU cores, other hosts) that an evaluation machine does not have.
  """
  import jax
  import orbax.checkpoint as ocp

  metadata = ocp.StandardCheckpointHandler().metadata(item_dir)
  tree = getattr(metadata, "tree", metadata)
  # local_devices: in a multi-process job jax.devices() lists other hosts' CPUs first.
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  return jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)


def restore_tree(path: pathlib.Path, source: str) -> Params:
  """One orbax parameter tree (a bare checkpoint or one item of a step), onto this host's CPU."""
  import orbax.checkpoint as ocp

  path = path.absolute()
  with read_failures.reporting_failure(), ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, _cpu_target(path))
  return _as_params(restored, source=source)


# ----------------------------------------------------------------------------- flat keys


def flatten_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """`{module: {name: x}}` -> `{"module/name": x}` (the safe `.npz` keys)."""
  flat = {}
  for module, group in params.items():
    for name, value in group.items():
      if "/" in name or not name:
        raise ValueError(f"Parameter name {name!r} in module {module!r} is empty or contains "
                         "'/', so its flat key could not be split back unambiguously.")
      flat[f"{module}/{name}"] = value
  return flat


def unflatten_params(flat: Mapping[str, Any], source: str = "checkpoint") -> Params:
  """`{"module/name": x}` -> `{module: {name: x}}`, splitting on the last `/`."""
  params: Params = {}
  for key, value in flat.items():
    module, sep, name = key.rpartition("/")
    if not sep or not module or not name:
      raise ValueError(f"{source}: key {key!r} is not '<module_path>/<param_name>', so this is "
                       "not a parameter file written by save_params_npz.")
    params.setdefault(module, {})[name] = np.asarray(value)
  return params
