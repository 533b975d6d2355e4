"""timm's trained NF weights by name: `timm:eca_nfnet_l0` -> the Hugging Face hub's file.

Each entry of `HUB_WEIGHTS` is a timm checkpoint, `timm/<name>.<tag>` on the
hub, whose `model.safetensors` is fetched through `huggingface_hub` (its
cache, `HF_HUB_OFFLINE`, `HF_ENDPOINT` for mirrors, `HF_HUB_CACHE`), read with
`safetensors` (a safetensors file holds arrays and a JSON header, never
code; PyTorch is not needed), checked and converted to our tree once
(`weights.timm.from_timm`), and kept as this project's `.npz` in our cache,
keyed by the hub revision the file came from.

The weights travel with how timm evaluates them (`EvalSettings`: resolution,
crop fraction and mode, interpolation, normalisation): `meta(name)` records
the resolution, crop and normalisation (`EvalSettings.eval_preproc`,
`.normalization`) that `evaluate`, `classify`, `export` and fine-tuning apply,
and timm's settings in full. Both crops are bicubic here as in timm (TF's
bicubic, without the antialiasing of PIL's when it downscales).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Optional

from nfnets_jax.data import preproc_spec
from nfnets_jax.weights import download, formats

PREFIX = "timm:"
FILENAME = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How timm evaluates a checkpoint (its `test_input_size`, `test_crop_pct` or
  `crop_pct`, `crop_mode`, `interpolation`, `mean`, `std`).

  crop_mode 'center': resize the shorter side to image_size / crop_pct, then
  take the central image_size square; 'squash': resize the whole image to that
  square size, ignoring the aspect ratio, then take the central square.
  """
  image_size: int
  crop_pct: float
  crop_mode: str = "center"
  interpolation: str = "bicubic"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @property
  def eval_preproc(self) -> str:
    """This project's form of the crop (`data.preproc_spec`): 'resize_crop_<pct>' squashes
    as timm's 'squash' does, 'center_crop_<pct>' keeps the aspect ratio as 'center' does."""
    return f"{'resize_crop' if self.crop_mode == 'squash' else 'center_crop'}_{self.crop_pct}"

  @property
  def normalization(self) -> str:
    """This project's name for timm's `mean` and `std` (`preproc_spec.NORMALIZATIONS`)."""
    return preproc_spec.normalization_named(self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class HubWeight:
  """One trained timm checkpoint: model, pretrained tag, top-1 as timm publishes it
  (percent, at `settings`), and its evaluation settings."""
  name: str
  tag: str
  imagenet_top1: Optional[float]
  settings: EvalSettings

  @property
  def repo_id(self) -> str:
    return f"timm/{self.name}.{self.tag}"


def _dm(name: str, size: int, crop_pct: float, top1: float) -> HubWeight:
  """DeepMind's NFNet-F weights as timm hosts them (squash crops)."""
  return HubWeight(name, "dm_in1k", top1, EvalSettings(size, crop_pct, crop_mode="squash"))


#: timm name -> its trained weights (timm's `default_cfgs` entries with hub weights).
#: The dm_nfnet top-1 figures are DeepMind's (the `published:` catalogue's).
HUB_WEIGHTS: Mapping[str, HubWeight] = {w.name: w for w in (
    _dm("dm_nfnet_f0", 256, 0.9, download.PUBLISHED["F0"].imagenet_top1),
    _dm("dm_nfnet_f1", 320, 0.91, download.PUBLISHED["F1"].imagenet_top1),
    _dm("dm_nfnet_f2", 352, 0.92, download.PUBLISHED["F2"].imagenet_top1),
    _dm("dm_nfnet_f3", 416, 0.94, download.PUBLISHED["F3"].imagenet_top1),
    _dm("dm_nfnet_f4", 512, 0.951, download.PUBLISHED["F4"].imagenet_top1),
    _dm("dm_nfnet_f5", 544, 0.954, download.PUBLISHED["F5"].imagenet_top1),
    _dm("dm_nfnet_f6", 576, 0.956, download.PUBLISHED["F6"].imagenet_top1),
    HubWeight("nfnet_l0", "ra2_in1k", 82.8, EvalSettings(288, 1.0)),
    HubWeight("eca_nfnet_l0", "ra2_in1k", 82.6, EvalSettings(288, 1.0)),
    HubWeight("eca_nfnet_l1", "ra2_in1k", 84.1, EvalSettings(320, 1.0)),
    HubWeight("eca_nfnet_l2", "ra3_in1k", 84.7, EvalSettings(384, 1.0)),
    HubWeight("nf_regnet_b1", "ra2_in1k", 79.4, EvalSettings(288, 0.9)),
    HubWeight("nf_resnet50", "ra2_in1k", 80.7, EvalSettings(288, 0.94)),
    HubWeight("test_nfnet", "r160_in1k", None,
              EvalSettings(160, 0.95, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))),
)}


def is_hub_name(path: Any) -> bool:
  """Whether `path` names timm's trained weights (`'timm:eca_nfnet_l0'`), not a file."""
  return isinstance(path, str) and path.startswith(PREFIX)


def lookup(name: str) -> HubWeight:
  """'timm:eca_nfnet_l0' (or 'eca_nfnet_l0') -> its entry, or an error listing the trained ones."""
  key = name[len(PREFIX):] if is_hub_name(name) else name
  if key in HUB_WEIGHTS:
    return HUB_WEIGHTS[key]
  valid = ", ".join(PREFIX + n for n in HUB_WEIGHTS)
  raise download.UnknownVariantError(
      f"No trained timm weights for {name!r}; timm publishes weights for: {valid}.")


def model_name(entry: HubWeight) -> str:
  return PREFIX + entry.name


def meta(name: str) -> dict[str, Any]:
  """What a training checkpoint's `meta` records, for timm's trained weights: the
  network, and how to evaluate it (`eval`: resolution and crop, read by evaluate and classify;
  `timm_eval`: timm's settings in full, interpolation and normalisation too)."""
  entry = lookup(name)
  s = entry.settings
  return {"model": model_name(entry), "num_classes": 1000, "model_kwargs": {},
          "eval": {"image_size": s.image_size, "eval_preproc": s.eval_preproc,
                   "normalization": s.normalization},
          "timm_eval": {**dataclasses.asdict(s), "mean": list(s.mean), "std": list(s.std)},
          "source": f"hf://{entry.repo_id}/{FILENAME}"}


def resolve(path: Any) -> Optional[tuple[HubWeight, dict[str, Any]]]:
  """`(entry, meta)` when `path` names timm's trained weights, else None."""
  if not is_hub_name(path):
    return None
  return lookup(path), meta(path)


def fetch(entry: HubWeight, *, cache_dir: Optional[str | pathlib.Path] = None) -> pathlib.Path:
  """The hub file of `entry`, through huggingface_hub's cache (downloaded when missing
  and the hub is reachable; `HF_HUB_OFFLINE=1` never connects).

  Raises:
    download.OfflineError: not cached and offline or unreachable, saying which file
      to put where.
    download.DownloadError: the hub answered without the file.
  """
  from huggingface_hub import constants, hf_hub_download  # pylint: disable=import-outside-toplevel
  from huggingface_hub import errors  # pylint: disable=import-outside-toplevel

  try:
    return pathlib.Path(hf_hub_download(entry.repo_id, FILENAME, cache_dir=cache_dir))
  except errors.LocalEntryNotFoundError as err:
    cache = pathlib.Path(cache_dir or constants.HF_HUB_CACHE)
    repo = cache / f"models--{entry.repo_id.replace('/', '--')}"
    raise download.OfflineError(
        f"{entry.repo_id}/{FILENAME} is not in the Hugging Face cache and cannot be downloaded "
        f"({err.__class__.__name__}). On a machine with network, run "
        f"`hf download {entry.repo_id} {FILENAME}` (or python -c \"import huggingface_hub; "
        f"huggingface_hub.hf_hub_download('{entry.repo_id}', '{FILENAME}')\") and copy "
        f"{repo} here, so that {repo}/snapshots/<revision>/{FILENAME} holds the file and "
        f"{repo}/refs/main names <revision>; or set HF_ENDPOINT to a mirror, or HF_HUB_CACHE "
        "to a cache that has it.") from None
  except (errors.EntryNotFoundError, errors.RepositoryNotFoundError) as err:
    raise download.DownloadError(f"The hub has no {entry.repo_id}/{FILENAME}: {err}") from None


def converted_path(hub_file: pathlib.Path, entry: HubWeight,
                   cache_dir: Optional[str | pathlib.Path] = None) -> pathlib.Path:
  """Where our `.npz` of `hub_file` is kept: our cache (`download.resolve_cache_dir`),
  named after the repository and the hub revision (the snapshot directory)."""
  revision = hub_file.parent.name
  return download.resolve_cache_dir(cache_dir) / "timm" / f"{entry.name}.{entry.tag}-{revision}.npz"


def load(name: str, *, hub_cache_dir: Optional[str | pathlib.Path] = None,
         cache_dir: Optional[str | pathlib.Path] = None) -> formats.Params:
  """Our published-layout parameters of timm's trained `name` ('timm:eca_nfnet_l0').

  Read from our converted `.npz` when there is one for the hub's revision;
  otherwise the hub file is fetched (`fetch`), read with safetensors, checked
  and converted (`timm.from_timm`, which names any key or shape that does not
  fit) and the `.npz` written.
  """
  from nfnets_jax.weights import timm  # pylint: disable=import-outside-toplevel

  entry = lookup(name)
  hub_file = fetch(entry, cache_dir=hub_cache_dir)
  converted = converted_path(hub_file, entry, cache_dir)
  if converted.exists():
    return formats.load_file(converted, trust_pickle=False)
  state_dict = timm.load_timm_state_dict(hub_file)
  params = timm.from_timm(state_dict, model_name(entry), num_classes=1000)
  formats.save_params_npz(params, converted)
  return params
