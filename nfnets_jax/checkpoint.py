"""Loading and saving Haiku parameter trees, from every place weights live.

`load_params(path)` returns `{module_path: {name: np.ndarray}}`, the tree the
models' `apply` takes, from any of:

* **this project's safe `.npz`** (`save_params_npz`): one array per parameter
  under the flat key `"<module_path>/<name>"`, e.g.
  `"NFNet/~/nf_block_3/~/conv1/w"`. It is read with `allow_pickle=False`, so
  opening it can never run code. Module paths contain `/~/`, so a key is split
  on its *last* `/`.
* **the published DeepMind files** (`F0_haiku.npz` ... `F6_haiku.npz`): despite
  the suffix these are dill pickles of the nested dict. A plain unpickler runs
  whatever code a file names, so pickles are read with `safe_pickle`, which
  rebuilds only dicts and NumPy arrays (and the 2021 Haiku/JAX containers of
  them) and refuses any other class or function by name, unrun
  (`UntrustedPickleError`). The published files load that way with no flag;
  `trust_pickle=True` reads other pickles with full dill, running their code.
  Convert a published file once to the safe format with
  `python -m nfnets_jax.convert --from_pickle=F0_haiku.npz --out=F0_safe.npz`.
  Files are recognised by their first bytes, never by their suffix.
* **an orbax checkpoint directory** holding just a params tree
  (`save_params_orbax`, or any `StandardCheckpointer`/`PyTreeCheckpointer` save).
* **a training workdir**, in the layout below (latest step unless `step` is
  given; the EMA weights with `ema=True`). A single step directory
  (`workdir/checkpoints/<step>`) loads too.

Training workdir layout (the contract between training and evaluation)::

    <workdir>/
      checkpoints/            an orbax.checkpoint.CheckpointManager directory
        <step>/               one directory per saved step, named by the bare
                              integer (CheckpointManager's default step format)
          params/             item "params": the Haiku params tree, an orbax
                              PyTree item (ocp.args.PyTreeSave; items that
                              earlier versions wrote with StandardSave hold
                              the same arrays and load the same way)
          ema_params/         item "ema_params" (optional): the EMA of params,
                              same tree, same handler
          meta/               item "meta" (optional): JSON with at least
                              `model`, `num_classes` and `model_kwargs`, so
                              tools can rebuild the network (`load_meta`);
                              and, from newer runs, `eval` (dataset, data_dir,
                              val_fraction, split, image_size, eval_preproc,
                              ema: how the run evaluates) and `class_names`
          ...                 any other items (optimizer state, data iterator,
                              step counters); loading ignores them

`checkpoint_manager(workdir)` opens (or creates) that manager, and
`PARAMS_ITEM` / `EMA_PARAMS_ITEM` / `META_ITEM` name the items, so the training
loop and these loaders cannot drift apart.

When `model=` is given, the loaded tree is checked against the model's own
parameter shapes and any mismatch is reported by name (`ParameterMismatchError`).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import struct
import tempfile
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from nfnets_jax import pretrained, safe_pickle

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

Params = dict[str, dict[str, np.ndarray]]
PathLike = Union[str, os.PathLike]

#: Orbax item names inside each step of a training workdir (see module docstring).
PARAMS_ITEM = "params"
EMA_PARAMS_ITEM = "ema_params"
#: Optional JSON item of each step: the model name, num_classes, model kwargs, how the
#: run evaluates and its class names (see `nfnets_jax.inference`).
META_ITEM = "meta"
#: Subdirectory of a training workdir that holds the CheckpointManager.
CHECKPOINTS_SUBDIR = "checkpoints"

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTO = b"\x80"
# Files orbax writes at the top of a checkpoint directory (any of them suffices).
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
# Listing every bad name of a wholly wrong checkpoint would bury the message.
_MAX_LISTED = 25


class ParameterMismatchError(ValueError):
  """A parameter tree does not fit the model (or layout) it is meant for.

  `missing`, `unexpected` and `mismatched` hold the offending names (with
  shapes) so that callers can act on them, not just print them.
  """

  def __init__(self, what: str,
               missing: Sequence[tuple[str, tuple[int, ...]]] = (),
               unexpected: Sequence[tuple[str, tuple[int, ...]]] = (),
               mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
               hint: str = ""):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f"{what} does not match:"]
    lines += _listing("missing (the model has them, the checkpoint does not)",
                      [f"{name} {shape}" for name, shape in self.missing])
    lines += _listing("unexpected (the checkpoint has them, the model does not)",
                      [f"{name} {shape}" for name, shape in self.unexpected])
    lines += _listing("wrong shape",
                      [f"{name}: checkpoint {got}, model {want}"
                       for name, got, want in self.mismatched])
    if hint:
      lines.append(hint)
    super().__init__("\n".join(lines))


def _listing(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  shown = [f"    {item}" for item in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    shown.append(f"    ... and {len(items) - _MAX_LISTED} more")
  return [f"  {title}: {len(items)}"] + shown


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


def checkpoint_manager(workdir: PathLike, *, max_to_keep: Optional[int] = None,
                       create: bool = True, item_handlers: Optional[Mapping[str, Any]] = None,
                       **options: Any) -> "ocp.CheckpointManager":
  """The `orbax.checkpoint.CheckpointManager` of a training workdir.

  Save a step with::

      manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          ema_params=ocp.args.StandardSave(ema_params), ...))

  `item_handlers` (item name -> orbax handler) go to the manager; extra
  keyword arguments go to `CheckpointManagerOptions`.
  """
  import orbax.checkpoint as ocp

  directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_SUBDIR
  return ocp.CheckpointManager(
      directory, item_handlers=dict(item_handlers) if item_handlers else None,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, **options))


# ----------------------------------------------------------------------------- loading


def load_params(path: PathLike, *, trust_pickle: bool = False, model: Optional[str] = None,
                num_classes: Optional[int] = None,
                model_kwargs: Optional[Mapping[str, Any]] = None,
                ema: bool = False, step: Optional[int] = None) -> Params:
  """Loads a Haiku parameter tree from a file, orbax directory or training workdir.

  Args:
    path: a safe `.npz`, a published pickle, an orbax params checkpoint, a
      training workdir, its `checkpoints/` directory, or one step directory.
      The format is read from the content, not the name.
    trust_pickle: read a pickle with full dill instead of the restricted
      unpickler. Not needed for the published `*_haiku.npz` files (plain
      dicts of arrays); for other pickles it executes code named in the
      file: only for files you trust.
    model: e.g. `'nfnet:F0'`; when given, the tree is checked against that
      model's parameter shapes and a mismatch raises `ParameterMismatchError`.
    num_classes: classifier size for that check; by default read from the
      checkpoint's final `linear` layer.
    model_kwargs: constructor arguments of the model (e.g. `{'width': 2}`) for
      that check.
    ema: from a workdir or step directory, load the EMA weights instead.
    step: from a workdir, load this step instead of the latest.

  Returns:
    `{module_path: {name: np.ndarray}}`.
  """
  if pretrained.is_published_name(path):
    params = _load_published(path, ema=ema, step=step)
  else:
    params = _load_path(pathlib.Path(path), trust_pickle=trust_pickle, ema=ema, step=step)
  if model is not None:
    validate_params(params, model, num_classes=num_classes, model_kwargs=model_kwargs,
                    source=str(path))
  return params


def _load_path(path: pathlib.Path, *, trust_pickle: bool, ema: bool,
               step: Optional[int]) -> Params:
  """`load_params` of a file or directory."""
  if not path.exists():
    raise FileNotFoundError(
        f"No checkpoint at {str(path)!r}: expected a .npz file, a published *_haiku.npz pickle, "
        "an orbax checkpoint directory or a training workdir.")
  if path.is_dir():
    return _load_directory(path, ema=ema, step=step)
  if ema or step is not None:
    raise ValueError(
        f"{str(path)!r} is a single file holding one parameter tree; ema= and step= apply only "
        "to training workdirs (and their checkpoint directories).")
  return _load_file(path, trust_pickle=trust_pickle)


def _load_published(name: str, *, ema: bool, step: Optional[int]) -> Params:
  """`load_params` of `'published:<variant>'`: downloaded once, verified, converted
  (`nfnets_jax.pretrained`)."""
  if ema or step is not None:
    raise ValueError(f"{name!r} names one published parameter tree; ema= and step= apply only "
                     "to training workdirs (and their checkpoint directories).")
  return pretrained.load(pretrained.variant_of(name))


def load_meta(path: PathLike, *, step: Optional[int] = None) -> Optional[dict[str, Any]]:
  """The `meta` JSON item saved with a training checkpoint step, if there is one.

  The trainer records which network the weights belong to (`model`,
  `num_classes`, `model_kwargs`, plus `step`), so that evaluation tools need
  not be told again. `path` is read like `load_params` reads it: a workdir
  (latest step unless `step` is given), its `checkpoints/` directory, or one
  step directory.

  Returns:
    The JSON object, or None when `path` is a file, an orbax checkpoint of a
    bare parameter tree, or a step saved without a `meta` item. For published
    weights (`'published:F0'`), what they are: `nfnet:F0`, 1000 classes.
  """
  if pretrained.is_published_name(path):
    return pretrained.meta(pretrained.variant_of(path))
  path = pathlib.Path(path)
  if not path.is_dir():
    if not path.exists():
      raise FileNotFoundError(f"No checkpoint at {str(path)!r}.")
    return None
  found = _locate(path, step=step)
  if found.kind != "step" or not (found.directory / META_ITEM).is_dir():
    return None
  import orbax.checkpoint as ocp  # Lazy: only directories are orbax checkpoints.

  meta = ocp.JsonCheckpointHandler().restore(found.directory / META_ITEM, ocp.args.JsonRestore())
  if not isinstance(meta, Mapping):
    raise ValueError(f"{found.label}: the {META_ITEM!r} item holds a "
                     f"{type(meta).__name__}, not a JSON object.")
  return dict(meta)


def _load_file(path: pathlib.Path, *, trust_pickle: bool) -> Params:
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


class _Found(NamedTuple):
  """What a checkpoint directory holds, as `_locate` found it."""
  kind: str  # "step" (the items of one step), "tree" (one bare orbax tree) or "unknown"
  directory: pathlib.Path  # absolute
  label: str  # how messages name it


def _locate(path: pathlib.Path, *, step: Optional[int]) -> _Found:
  """Resolves a workdir, its `checkpoints/` directory or a step directory to one step.

  The one place that reads the workdir layout, for `load_params` and
  `load_meta` alike; `step` (default: the latest) picks a manager's step.
  """
  if (path / CHECKPOINTS_SUBDIR).is_dir():
    return _manager_step(path / CHECKPOINTS_SUBDIR, step=step, label=str(path))
  if any(_is_orbax_dir(path / item) for item in (PARAMS_ITEM, EMA_PARAMS_ITEM)):
    if step is not None:
      raise ValueError(f"{str(path)!r} is a single step directory; step= applies to workdirs.")
    return _Found("step", path.absolute(), str(path))
  if _is_orbax_dir(path):
    return _Found("tree", path.absolute(), str(path))
  if any(child.name.isdigit() and child.is_dir() for child in path.iterdir()):
    return _manager_step(path, step=step, label=str(path))
  return _Found("unknown", path.absolute(), str(path))


def _manager_step(directory: pathlib.Path, *, step: Optional[int], label: str) -> _Found:
  """The step directory of a CheckpointManager's `step` (default: its latest finished one)."""
  import orbax.checkpoint as ocp

  directory = directory.absolute()
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    steps = list(mngr.all_steps())
    if not steps:
      raise FileNotFoundError(f"{label} holds no finished checkpoint step yet.")
    if step is None:
      step = mngr.latest_step()
    elif step not in steps:
      raise ValueError(f"{label} has no step {step}; saved steps: {sorted(steps)}.")
  return _Found("step", directory / str(step), f"{label} (step {step})")


def _load_directory(path: pathlib.Path, *, ema: bool, step: Optional[int]) -> Params:
  found = _locate(path, step=step)
  if found.kind == "step":
    present = [child.name for child in found.directory.iterdir() if child.is_dir()]
    item = _item_name(ema, present, label=found.label)
    try:
      return _restore_tree(found.directory / item, source=f"{found.label}, {item}")
    except Exception as err:  # orbax/tensorstore: ValueError, OSError, or a bare Exception
      raise DamagedCheckpointError(found, item, err) from err
  if found.kind == "tree":
    if ema or step is not None:
      raise ValueError(
          f"{str(path)!r} is an orbax checkpoint of one parameter tree; it has no EMA copy or "
          "steps. ema= and step= apply to training workdirs.")
    return _restore_tree(found.directory, source=str(path))
  raise ValueError(
      f"{str(path)!r} is a directory but neither a training workdir (no {CHECKPOINTS_SUBDIR}/ "
      f"inside), a checkpoint step (no {PARAMS_ITEM}/ inside) nor an orbax checkpoint (none of "
      f"{', '.join(_ORBAX_MARKERS)}).")


class DamagedCheckpointError(ValueError):
  """A step of a workdir exists but its item cannot be read (a truncated or missing file).

  The message names the step and lists the other saved steps, which the
  trainer would fall back to (nfnets_jax/train/checkpoint_recovery.py); a
  reader asks for one explicitly (`step=`, the tools' `--step`).
  """

  def __init__(self, found: "_Found", item: str, err: BaseException):
    directory = found.directory.parent
    others = sorted(int(p.name) for p in directory.iterdir()
                    if p.name.isdigit() and p.is_dir() and p != found.directory)
    cause = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    super().__init__(
        f"{found.label}: the {item!r} item cannot be read ({cause}); the checkpoint may be "
        f"damaged (a truncated or missing file). Other saved steps in {directory}: "
        f"{others or 'none'}" + ("; read one with step= (--step)." if others else "."))


def _is_orbax_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any((path / marker).exists() for marker in _ORBAX_MARKERS)


def _item_name(ema: bool, available: Iterable[str], label: str) -> str:
  item = EMA_PARAMS_ITEM if ema else PARAMS_ITEM
  available = sorted(available)
  if item not in available:
    raise ValueError(
        f"{label} has no {item!r} item (it has: {', '.join(available) or 'nothing'})"
        + ("; it was saved without EMA weights, drop ema=True." if ema else "."))
  return item


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


def _restore_tree(path: pathlib.Path, source: str) -> Params:
  """One orbax parameter tree (a bare checkpoint or one item of a step), onto this host's CPU."""
  import orbax.checkpoint as ocp

  path = path.absolute()
  with ocp.StandardCheckpointer() as checkpointer:
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


# ----------------------------------------------------------------------------- validation


def infer_num_classes(params: Mapping[str, Mapping[str, Any]]) -> Optional[int]:
  """Classifier width from the top-level `<root>/~/linear` bias, if there is one."""
  for module, group in params.items():
    if module.count("/~/") == 1 and module.endswith("/~/linear") and "b" in group:
      return int(np.shape(group["b"])[0])
  return None


def validate_params(params: Mapping[str, Mapping[str, Any]], model: str, *,
                    num_classes: Optional[int] = None,
                    model_kwargs: Optional[Mapping[str, Any]] = None,
                    source: str = "checkpoint") -> None:
  """Raises `ParameterMismatchError` unless `params` has exactly `model`'s parameters and shapes."""
  from nfnets_jax import models  # Lazy: loading bare files must not need JAX/Haiku.

  if num_classes is None:
    num_classes = infer_num_classes(params) or 1000
  kwargs = dict(model_kwargs or {})
  expected = models.param_shapes(model, num_classes, **kwargs)
  want = {f"{m}/{n}": tuple(leaf.shape) for m, group in expected.items() for n, leaf in group.items()}
  got = {f"{m}/{n}": tuple(np.shape(v)) for m, group in params.items() for n, v in group.items()}
  settings = ", ".join([f"num_classes={num_classes}"] + [f"{k}={v!r}" for k, v in kwargs.items()])
  check_shapes(got, want, f"{source} vs model {model!r} ({settings})",
               hint="Check the model name, num_classes and model arguments the checkpoint was "
                    "trained with.")


def check_shapes(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]],
                 what: str, hint: str = "") -> None:
  """Raises `ParameterMismatchError` naming every missing, unexpected and mis-shaped key."""
  missing = [(key, want[key]) for key in sorted(set(want) - set(got))]
  unexpected = [(key, got[key]) for key in sorted(set(got) - set(want))]
  mismatched = [(key, got[key], want[key]) for key in sorted(set(want) & set(got))
                if got[key] != want[key]]
  if missing or unexpected or mismatched:
    raise ParameterMismatchError(what, missing, unexpected, mismatched, hint=hint)
