"""The settings of the input pipeline in four groups, without TensorFlow.

`pipeline.build` takes them as these frozen dataclasses; `load` takes every
field as a keyword of the same name and groups them (`group_keywords`). Each
group checks its own fields when it is made, so a bad value is refused (by a
`ValueError` naming it and what would be valid) before any data or TensorFlow
is touched; what depends on `is_training`, `batch_dims` or on two groups at
once is checked by `build`.
"""

import dataclasses
import os
from typing import Any, Optional

import ml_dtypes  # Registers 'bfloat16' with NumPy, so the name is understood without TF.
import numpy as np

from nfnets_jax.data import subsets
from nfnets_jax.data.augment_spec import AugmentSpec, check_mix_source, parse_augment_name
from nfnets_jax.data.preproc_spec import (DEFAULT_NORMALIZATION, check_train_preproc,
                                          image_size_hw, normalization_stats, parse_eval_preproc)


def image_dtype(dtype: Any) -> np.dtype:
  """The NumPy dtype of `images` that `dtype` names; a ValueError unless it is a float type."""
  try:
    np_dtype = np.dtype(dtype)
  except TypeError:
    np_dtype = None
  if np_dtype is None or not (np.issubdtype(np_dtype, np.floating)
                              or np_dtype == np.dtype(ml_dtypes.bfloat16)):
    raise ValueError(f"dtype must be a floating type (float32, bfloat16, float16), got {dtype!r}")
  return np_dtype


def _optional_int(name: str, value: Any, minimum: int) -> None:
  if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                            or value < minimum):
    raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What each image becomes, and the layout of the batches.

  Attributes:
    image_size: Output side, or (height, width).
    train_preproc: 'inception_crop' (published: random crop + flip) or 'resize'
      (whole image, for data such as digits that crops or mirroring would relabel).
    eval_preproc: 'crop_resize', 'resize_crop_<pct>' or 'center_crop_<fraction>' (see
      `preprocess.py`).
    normalization: The per-channel statistics images are normalised with, training and
      evaluation alike: 'imagenet' or 'inception' (`preproc_spec.NORMALIZATIONS`).
    dtype: dtype of `images` (float32, bfloat16 or float16).
    transpose: Put the innermost batch dimension last (HWCN per device), the TPU
      double-transpose layout.
  """
  image_size: int | tuple[int, int]
  train_preproc: str = "inception_crop"
  eval_preproc: str = "resize_crop_32"
  normalization: str = DEFAULT_NORMALIZATION
  dtype: Any = np.float32
  transpose: bool = False

  def __post_init__(self) -> None:
    image_size_hw(self.image_size)
    parse_eval_preproc(self.eval_preproc)
    normalization_stats(self.normalization)
    check_train_preproc(self.train_preproc)
    image_dtype(self.dtype)

  @property
  def size_hw(self) -> tuple[int, int]:
    return image_size_hw(self.image_size)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Training-only augmentation: RandAugment and mixup/CutMix.

  Attributes:
    augment_name: e.g. 'cutmix_mixup_randaugment_405' (see `augment_spec.py`);
      None or '' for none. Validated always, used in training only.
    augment_before_mix: RandAugment each image before mixing (published default)
      rather than the mixed images.
    mix_source: Where each mixed image's partner comes from: 'stream' (the next
      example read, so two decoded images per output, as published) or 'batch'
      (another image of the same innermost batch: one decoded image per output).
      The mixing statistics are the same either way (see `mixing.py`).
  """
  augment_name: Optional[str] = None
  augment_before_mix: bool = True
  mix_source: str = "stream"

  def __post_init__(self) -> None:
    parse_augment_name(self.augment_name)
    check_mix_source(self.mix_source)

  @property
  def spec(self) -> AugmentSpec:
    return parse_augment_name(self.augment_name)


@dataclasses.dataclass(frozen=True)
class Stream:
  """Which examples this process reads, in what order, and from which step.

  Attributes:
    seed: Seed of all randomness; None draws a fresh one.
    deterministic: Reproducible, ordered training (needs a seed); defaults to
      `seed is not None`.
    start_step: Training batches already consumed (a saved `Batches.step`). In
      deterministic mode the stream skips them, so a resumed run sees exactly the
      batches an uninterrupted run would (skipping reads, but does not decode,
      the skipped records: its cost grows with the step). In fast mode it only
      sets `Batches.step`, and the resumed stream is a fresh random one.
    process_index, process_count: This host's place; default JAX's.
    shuffle_buffer: Examples in the shuffle buffer (default max(1000, 10 x the
      examples per step), at most the examples of this process's part).
  """
  seed: Optional[int] = None
  deterministic: Optional[bool] = None
  start_step: int = 0
  process_index: Optional[int] = None
  process_count: Optional[int] = None
  shuffle_buffer: Optional[int] = None

  def __post_init__(self) -> None:
    if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
      raise ValueError(f"seed must be an int or None, got {self.seed!r}")
    if not isinstance(self.start_step, int) or self.start_step < 0:
      raise ValueError(f"start_step must be an int >= 0, got {self.start_step!r}")
    _optional_int("shuffle_buffer", self.shuffle_buffer, 1)

  @property
  def is_deterministic(self) -> bool:
    return self.seed is not None if self.deterministic is None else bool(self.deterministic)


@dataclasses.dataclass(frozen=True)
class Reading:
  """Where the examples come from, and how tf.data runs.

  Attributes:
    data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
    val_fraction: For a single-tree 'folder:<path>', the fraction of each class
      held out as its 'validation' split (0: none; see `folder.py`).
    manual_dir: Where the ImageNet archives are (default <data_dir>/downloads/manual).
    download: Allow TFDS to download a dataset that is not prepared.
    fake_data: Zeros of the right shapes without touching any dataset (training:
      endless; evaluation: one batch).
    cache: Cache the encoded images in memory (default: when process_count > 1,
      where each process reads only its part, as published).
    num_threads: tf.data's private thread pool size (default: one per core).
    autotune: Let tf.data's autotuner size parallelism and buffers (published
      setting). Off, each parallel stage uses one call per core. Switch it off
      for short runs: dropping an autotuned iterator waits for the autotuner's
      current sleep, which can hold a short run's exit (see docs/performance.md).
    classes: Read only these classes, relabelled 0..k-1 in the order given
      ('5-9', '0,3,7' or a sequence of ints; see `subsets.py`).
    examples_per_class: Read only the first N examples of each class, in the
      split's stored order (None: all).
  """
  data_dir: Optional[str] = None
  val_fraction: float = 0.0
  manual_dir: Optional[str] = None
  download: bool = True
  fake_data: bool = False
  cache: Optional[bool] = None
  num_threads: Optional[int] = None
  autotune: bool = True
  classes: Optional[Any] = None
  examples_per_class: Optional[int] = None

  def __post_init__(self) -> None:
    _optional_int("num_threads", self.num_threads, 1)
    check_val_fraction(self.val_fraction)
    subsets.parse_classes(self.classes)
    subsets.check_examples_per_class(self.examples_per_class)


def check_val_fraction(value: Any) -> None:
  """A ValueError unless `value` is a number in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
    raise ValueError(f"val_fraction must be a number in [0, 1) (0: hold nothing out), "
                     f"got {value!r}")


GROUPS = {"preprocessing": Preprocessing, "augmentation": Augmentation, "stream": Stream,
          "reading": Reading}
# Each keyword of `load` names the field of exactly one group (no name is in two).
_GROUP_OF = {field.name: group for group, cls in GROUPS.items()
             for field in dataclasses.fields(cls)}


def group_keywords(**keywords: Any) -> dict[str, Any]:
  """`load`'s keywords as `build`'s groups: {'preprocessing': Preprocessing(...), ...}.

  A TypeError names a keyword that is no group's field, and lists the valid ones.
  """
  unknown = sorted(set(keywords) - set(_GROUP_OF))
  if unknown:
    raise TypeError(f"load() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                    f"valid: {', '.join(_GROUP_OF)}.")
  fields: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
  for name, value in keywords.items():
    fields[_GROUP_OF[name]][name] = value
  return {group: cls(**fields[group]) for group, cls in GROUPS.items()}


def absolute_dataset_name(name: str) -> str:
  """'folder:<path>' with a local path made absolute (so it names the same folder from any
  directory); any other name as it is."""
  prefix = "folder:"
  if name.startswith(prefix) and "://" not in name:
    return prefix + os.path.abspath(os.path.expanduser(name[len(prefix):]))
  return name
