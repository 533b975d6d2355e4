"""The training-run layout: a workdir's checkpoint steps, their items, damaged steps.

This is the contract between training and the tools that read its results::

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
                              tools can rebuild the network (`Found.meta`);
                              and, from newer runs, `eval` (dataset, data_dir,
                              val_fraction, split, image_size, eval_preproc,
                              ema: how the run evaluates) and `class_names`
          ...                 any other items (optimizer state, data iterator,
                              step counters); loading ignores them

`checkpoint_manager(workdir)` opens (or creates) that manager, and
`PARAMS_ITEM` / `EMA_PARAMS_ITEM` / `META_ITEM` name the items, so the training
loop and these readers cannot drift apart. `locate` resolves a workdir, its
`checkpoints/` directory or one step directory to a step, once, for both the
parameters and the record.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Optional

from nfnets_jax.weights import formats

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

#: Orbax item names inside each step of a training workdir (see module docstring).
PARAMS_ITEM = "params"
EMA_PARAMS_ITEM = "ema_params"
#: Optional JSON item of each step: the model name, num_classes, model kwargs, how the
#: run evaluates and its class names (see `nfnets_jax.weights.loading`).
META_ITEM = "meta"
#: Subdirectory of a training workdir that holds the CheckpointManager.
CHECKPOINTS_SUBDIR = "checkpoints"


def checkpoint_manager(workdir: formats.PathLike, *, max_to_keep: Optional[int] = None,
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


class Found(NamedTuple):
  """What a checkpoint directory holds, as `locate` found it, with the step's record."""
  kind: str  # "step" (the items of one step), "tree" (one bare orbax tree) or "unknown"
  directory: pathlib.Path  # absolute
  label: str  # how messages name it
  meta: Optional[dict[str, Any]] = None  # the step's `meta` item, if it has one


def locate(path: pathlib.Path, *, step: Optional[int]) -> Found:
  """Resolves a workdir, its `checkpoints/` directory or a step directory to one step.

  The one place that reads the workdir layout, for the parameters and the
  record alike; `step` (default: the latest) picks a manager's step, whose
  `meta` record is read here.
  """
  if (path / CHECKPOINTS_SUBDIR).is_dir():
    return _with_meta(_manager_step(path / CHECKPOINTS_SUBDIR, step=step, label=str(path)))
  if any(formats.is_orbax_dir(path / item) for item in (PARAMS_ITEM, EMA_PARAMS_ITEM)):
    if step is not None:
      raise ValueError(f"{str(path)!r} is a single step directory; step= applies to workdirs.")
    return _with_meta(Found("step", path.absolute(), str(path)))
  if formats.is_orbax_dir(path):
    return Found("tree", path.absolute(), str(path))
  if any(child.name.isdigit() and child.is_dir() for child in path.iterdir()):
    return _with_meta(_manager_step(path, step=step, label=str(path)))
  return Found("unknown", path.absolute(), str(path))


def _manager_step(directory: pathlib.Path, *, step: Optional[int], label: str) -> Found:
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
  return Found("step", directory / str(step), f"{label} (step {step})")


def read_params(found: Found, *, ema: bool, step: Optional[int]) -> formats.Params:
  """The parameter tree (`ema`: its EMA) of what `locate` found."""
  if found.kind == "step":
    present = [child.name for child in found.directory.iterdir() if child.is_dir()]
    item = _item_name(ema, present, label=found.label)
    try:
      params = formats.restore_tree(found.directory / item, source=f"{found.label}, {item}")
      _verify_checksums(found, item, params)
    except Exception as err:  # orbax/tensorstore: ValueError, OSError, or a bare Exception
      raise DamagedCheckpointError(found, item, err) from err
    return params
  if found.kind == "tree":
    if ema or step is not None:
      raise ValueError(
          f"{found.label!r} is an orbax checkpoint of one parameter tree; it has no EMA copy or "
          "steps. ema= and step= apply to training workdirs.")
    return formats.restore_tree(found.directory, source=found.label)
  raise ValueError(
      f"{found.label!r} is a directory but neither a training workdir (no {CHECKPOINTS_SUBDIR}/ "
      f"inside), a checkpoint step (no {PARAMS_ITEM}/ inside) nor an orbax checkpoint (none of "
      f"{', '.join(formats.ORBAX_MARKERS)}).")


def _verify_checksums(found: Found, item: str, params: formats.Params) -> None:
  """Compares `item` with the checksums its step recorded (runs from before they were
  recorded have none: nothing to compare)."""
  from nfnets_jax.weights import checksums  # pylint: disable=import-outside-toplevel  (jax)

  recorded = (found.meta or {}).get(checksums.CHECKSUMS_KEY, {}).get(item)
  if recorded:
    checksums.verify(checksums.tree_checksums(params), recorded, repr(item))


def _with_meta(found: Found) -> Found:
  """`found` (a step) with its `meta` JSON item, if it was saved with one."""
  if not (found.directory / META_ITEM).is_dir():
    return found
  import orbax.checkpoint as ocp  # Lazy: only directories are orbax checkpoints.

  try:
    meta = ocp.JsonCheckpointHandler().restore(found.directory / META_ITEM,
                                               ocp.args.JsonRestore())
  except Exception as err:  # a missing or garbled file: the step is damaged, others may not be
    raise DamagedCheckpointError(found, META_ITEM, err) from err
  if not isinstance(meta, Mapping):
    raise ValueError(f"{found.label}: the {META_ITEM!r} item holds a "
                     f"{type(meta).__name__}, not a JSON object.")
  return found._replace(meta=dict(meta))


class DamagedCheckpointError(ValueError):
  """A step of a workdir exists but its item cannot be read (a truncated or missing file,
  or arrays that differ from the checksums the step recorded).

  The message names the step and lists the other saved steps, which the
  trainer would fall back to (nfnets_jax/train/checkpoint_recovery.py); a
  reader asks for one explicitly (`step=`, the tools' `--step`).
  """

  def __init__(self, found: "Found", item: str, err: BaseException):
    directory = found.directory.parent
    others = sorted(int(p.name) for p in directory.iterdir()
                    if p.name.isdigit() and p.is_dir() and p != found.directory)
    cause = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    super().__init__(
        f"{found.label}: the {item!r} item cannot be read ({cause}); the checkpoint may be "
        f"damaged (a truncated, missing or changed file). Other saved steps in {directory}: "
        f"{others or 'none'}" + ("; read one with step= (--step)." if others else "."))


def _item_name(ema: bool, available: Iterable[str], label: str) -> str:
  item = EMA_PARAMS_ITEM if ema else PARAMS_ITEM
  available = sorted(available)
  if item not in available:
    raise ValueError(
        f"{label} has no {item!r} item (it has: {', '.join(available) or 'nothing'})"
        + ("; it was saved without EMA weights, drop ema=True." if ema else "."))
  return item
