"""`build` and `load`: the NFNets input pipeline, from a dataset name to batches of NumPy arrays.

`build` takes the settings in four groups (`options.py`); `load` takes the
same settings as keywords, for callers that set a few.

Per example: read the encoded image (never decoded by TFDS), drop it if it is
not a plausible image file, preprocess (random or centre crop, flip, bicubic
resize), optionally RandAugment, normalise. Then batch along `batch_dims`,
innermost first; with mixup/CutMix each output image is the mix of an example
with a partner (see `mixing.py`): the next example of the stream
(`mix_source='stream'`, published) or another example of the same innermost
batch (`'batch'`: half the decoding per output).

Two modes for training:
  * deterministic (the default when a `seed` is given): every random choice is
    a function of (seed, process, position in the stream), file order and
    shuffle are seeded and tf.data keeps order, so a run is reproducible and
    `load(..., start_step=k)` continues exactly where step k left off
    (`Batches.step` is the number to save);
  * fast (`deterministic=False`): the same ops with a fresh seed, and tf.data
    free to reorder parallel work, for throughput.
Evaluation always keeps order, covers every example of the split exactly once
across processes and pads the last batches with masked-out examples.
"""

import logging
import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from nfnets_jax.data import mixing, preprocess, randaugment, rng, sharding, subsets
from nfnets_jax.data._tf import tf
from nfnets_jax.data.augment_spec import AugmentSpec
from nfnets_jax.data.integrity import SkippedFiles
from nfnets_jax.data.options import (GROUPS, Augmentation, Preprocessing, Reading, Stream,
                                     group_keywords, image_dtype)
from nfnets_jax.data.sources import open_source

_log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
MIN_SHUFFLE_BUFFER = 1000


class Batches(Iterator[Batch]):
  """An iterator of batches that knows where it is.

  Attributes:
    step: Batches consumed so far, counting the `start_step` it was created with;
      pass it back as `load(..., start_step=step)` to resume a deterministic run.
    steps: For evaluation, the number of batches (the same on every process);
      None for (endless) training.
    num_examples: Real examples in this process's part of the split.
    num_classes: Label classes of the dataset.
  """

  def __init__(self, dataset: Optional[tf.data.Dataset], *, step: int, steps: Optional[int],
               num_examples: int, num_classes: int, skipped: SkippedFiles,
               fake_batches: Optional[Iterator[Batch]] = None) -> None:
    self.dataset = dataset
    self.step = step
    self.steps = steps
    self.num_examples = num_examples
    self.num_classes = num_classes
    self._skipped = skipped
    self._iterator: Optional[Iterator[Batch]] = fake_batches

  @property
  def skipped_files(self) -> list[str]:
    """Files dropped as corrupt so far (each also logged as a warning)."""
    return self._skipped.names

  def state(self) -> dict[str, int]:
    """What to save with a checkpoint: `load(..., start_step=state['step'])` resumes."""
    return {"step": self.step}

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> Batch:
    if self._iterator is None:
      self._iterator = self.dataset.as_numpy_iterator()
    batch = next(self._iterator)
    self.step += 1
    return batch

  def __len__(self) -> int:
    if self.steps is None:
      raise TypeError("A training iterator is endless; only evaluation iterators have a length.")
    return self.steps


def _check_batch_dims(batch_dims: Sequence[int]) -> tuple[int, ...]:
  try:
    dims = tuple(batch_dims)
  except TypeError:
    dims = ()
  if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                         for d in dims):
    raise ValueError(f"batch_dims must be a non-empty sequence of positive ints such as "
                     f"(num_local_devices, per_device_batch), got {batch_dims!r}")
  return tuple(int(d) for d in dims)


def _tf_dtype(dtype: Any) -> tf.DType:
  np_dtype = image_dtype(dtype)
  return tf.bfloat16 if np_dtype.name == "bfloat16" else tf.as_dtype(np_dtype)


def _check_group(name: str, value: Any) -> None:
  if not isinstance(value, GROUPS[name]):
    raise TypeError(f"{name} must be a data.{GROUPS[name].__name__}, got "
                    f"{type(value).__name__} {value!r}")


def _options(deterministic: bool, num_threads: Optional[int], autotune: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = autotune
  # One thread per op, many ops in flight: the published settings, which suit image decoding.
  options.threading.max_intra_op_parallelism = 1
  if num_threads is not None:
    options.threading.private_threadpool_size = num_threads
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  return options


def _fake_batches(dims: tuple[int, ...], size: tuple[int, int], np_dtype: np.dtype,
                  transpose: bool, is_training: bool, mixes: bool) -> Iterator[Batch]:
  images = np.zeros(dims + size + (3,), dtype=np_dtype)
  if transpose:
    images = np.moveaxis(images, len(dims) - 1, -1)
  batch = {"images": images, "labels": np.zeros(dims, np.int32)}
  if is_training and mixes:
    batch.update(mix_labels=np.zeros(dims, np.int32), ratio=np.ones(dims, np.float32))
  if not is_training:
    batch["mask"] = np.ones(dims, np.int32)
    yield batch
    return
  while True:
    yield batch


def load(name: str, split: str, *, is_training: bool, batch_dims: Sequence[int],
         image_size: int | Sequence[int], **options: Any) -> Batches:
  """`build` with every setting as a keyword: each names the field of that name of
  `Preprocessing`, `Augmentation`, `Stream` or `Reading` (see `options.py`).

      load('digits', 'train', is_training=True, batch_dims=(8,), image_size=32,
           augment_name='mixup', seed=0, data_dir=...)

  Raises:
    TypeError: a keyword that is no group's field (the message lists the valid ones).
    ValueError, FileNotFoundError: as `build`.
  """
  return build(name, split, is_training=is_training, batch_dims=batch_dims,
               **group_keywords(image_size=image_size, **options))


def build(name: str, split: str, *, is_training: bool, batch_dims: Sequence[int],
          preprocessing: Preprocessing, augmentation: Augmentation = Augmentation(),
          stream: Stream = Stream(), reading: Reading = Reading()) -> Batches:
  """Batches of a dataset split, preprocessed (and augmented) the NFNets way.

  Args:
    name: 'digits' (embedded), 'imagenet2012', 'folder:<path>', or any TFDS image
      classification dataset (see `sources.py`).
    split: A TFDS split, e.g. 'train', 'validation', 'train[10000:]' (the published
      runs hold out 'train[:10000]'); folders take whole split names.
    is_training: Training preprocessing, shuffling and endless repetition; else
      evaluation preprocessing, one ordered pass, padded and masked.
    batch_dims: Batch shape, e.g. (num_local_devices, per_device_batch).
    preprocessing: Image size, preprocessing, output dtype and layout.
    augmentation: RandAugment and mixing (training only).
    stream: Seed, determinism, resume step, this process's share, shuffling.
    reading: Data directories, fake data, caching and tf.data threading.

  Returns:
    A `Batches` iterator of dicts: `images` [*batch_dims, H, W, 3] normalised
    (or HWCN-transposed), `labels` int32; training with mixing adds `mix_labels`
    int32 and `ratio` float32 (weight of `labels`); evaluation adds `mask`
    int32 (1 real, 0 padding).

  Raises:
    TypeError: a group is not of its dataclass.
    ValueError: an argument is invalid (the message says what would be valid).
    FileNotFoundError: a dataset's manual files or folder are missing.
  """
  for group, value in zip(GROUPS, (preprocessing, augmentation, stream, reading)):
    _check_group(group, value)
  spec = augmentation.spec
  size = preprocessing.size_hw
  dims = _check_batch_dims(batch_dims)
  tf_dtype = _tf_dtype(preprocessing.dtype)
  index, count = sharding.resolve_process(stream.process_index, stream.process_count)
  start_step = stream.start_step
  if start_step and not is_training:
    raise ValueError("start_step only applies to training; evaluation always starts at its "
                     "first batch.")
  mixes = is_training and spec.mixes
  if mixes and spec.mixup and spec.cutmix and dims[-1] % 2:
    raise ValueError(f"{augmentation.augment_name!r} mixes half of each batch with mixup and "
                     f"half with CutMix, so the innermost batch dimension must be even; got "
                     f"batch_dims {dims}.")
  seed = stream.seed
  deterministic = stream.is_deterministic
  if deterministic and seed is None and is_training:
    raise ValueError("deterministic=True needs a seed: the file order, shuffle and augmentations "
                     "of a reproducible run all derive from it (pass seed=<int>).")
  transpose = preprocessing.transpose
  augment_before_mix = augmentation.augment_before_mix
  mix_source = augmentation.mix_source
  skipped = SkippedFiles()

  if reading.fake_data:
    np_dtype = np.dtype(tf_dtype.as_numpy_dtype)
    return Batches(None, step=start_step, steps=None if is_training else 1, num_examples=0,
                   num_classes=0, skipped=skipped,
                   fake_batches=_fake_batches(dims, size, np_dtype, transpose, is_training, mixes))

  source = subsets.restrict(
      open_source(name, split, data_dir=reading.data_dir, manual_dir=reading.manual_dir,
                  download=reading.download, val_fraction=reading.val_fraction),
      reading.classes, reading.examples_per_class)
  ds, num_local = source.read(split, process_index=index, process_count=count,
                              shuffle_files=is_training, seed=seed if deterministic else None)
  per_process_batch = math.prod(dims)
  key = rng.run_seed(seed, index)

  def keep(i, ex):
    del i
    return skipped.keep(ex["image"], ex["name"])

  if is_training:
    examples_per_step = per_process_batch * (2 if mixes and mix_source == "stream" else 1)
    if reading.cache if reading.cache is not None else count > 1:
      ds = ds.cache()
    ds = ds.repeat()
    # A buffer beyond one epoch of this process's part would only re-read the same files.
    buffer = stream.shuffle_buffer or max(
        1, min(max(MIN_SHUFFLE_BUFFER, 10 * examples_per_step), num_local))
    ds = ds.shuffle(buffer, seed=seed if deterministic else None, reshuffle_each_iteration=True)
    ds = ds.enumerate().filter(keep)
    if start_step and deterministic:
      # Exact resume: replay the stream's reads (no decoding) up to where step k began.
      # A fast-mode stream is random anyway, so it starts afresh instead of paying this.
      ds = ds.skip(start_step * examples_per_step)
    ds = ds.map(_train_example_fn(spec, size, key, mixes, augment_before_mix,
                                  preprocessing.train_preproc),
                num_parallel_calls=tf.data.AUTOTUNE)
    steps = None
  else:
    steps = sharding.eval_steps(source.part_sizes(split, count), per_process_batch)
    ds = ds.enumerate().filter(keep)
    eval_preproc = preprocessing.eval_preproc
    ds = ds.map(lambda i, ex: {"images": preprocess.normalize(
                                   preprocess.eval_image(ex["image"], size, eval_preproc)),
                               "labels": ex["label"], "mask": tf.constant(1, tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)
  if source.is_folder:
    ds = ds.ignore_errors(log_warning=True)  # Last resort for damage the byte checks miss.
  if not is_training:
    padding = tf.data.Dataset.from_tensors({
        "images": tf.zeros(size + (3,), tf.float32), "labels": tf.constant(0, tf.int32),
        "mask": tf.constant(0, tf.int32)}).repeat()
    ds = ds.concatenate(padding).take(steps * per_process_batch)

  ds = _batch(ds, dims, spec if mixes else AugmentSpec(), augment_before_mix, mix_source,
              tf_dtype, transpose)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  ds = ds.with_options(_options(deterministic or not is_training, reading.num_threads,
                                reading.autotune))
  return Batches(ds, step=start_step, steps=steps, num_examples=num_local,
                 num_classes=source.num_classes, skipped=skipped)


def _augment_normalize(image: tf.Tensor, spec: AugmentSpec, seed: tf.Tensor) -> tf.Tensor:
  if spec.randaugment:
    image = randaugment.randaugment_float(image, spec.randaugment_layers,
                                          spec.randaugment_magnitude, seed)
  return preprocess.normalize(image)


def _train_example_fn(spec: AugmentSpec, size: tuple[int, int], key: tf.Tensor, mixes: bool,
                      augment_before_mix: bool, train_preproc: str):
  """The per-example training map: (stream position, example) -> features."""
  augment_later = mixes and not augment_before_mix

  def fn(index, ex):
    crop_seed, augment_seed, mix_seed = rng.split_seed(rng.example_seed(key, index), 3)
    image = preprocess.train_image(ex["image"], size, crop_seed, train_preproc)
    out = {"labels": ex["label"]}
    if mixes:
      out["mix_seed"] = mix_seed
    if augment_later:
      out["images"] = image
      out["augment_seed"] = augment_seed
    else:
      out["images"] = _augment_normalize(image, spec, augment_seed)
    return out

  return fn


def _mix_fn(spec: AugmentSpec, batch_size: int, augment_before_mix: bool):
  """(output position, example, its partner) -> the mixed output (`mixing.py`),
  RandAugment-ed once here unless each example was before mixing."""
  def mix(index, a, b):
    out = mixing.mix_pair(spec, a, b, a["mix_seed"], mixing.uses_cutmix(spec, index, batch_size))
    if not augment_before_mix:
      out["images"] = _augment_normalize(out["images"], spec, a["augment_seed"])
    return out

  return mix


def _mix_pairs(ds: tf.data.Dataset, spec: AugmentSpec, batch_size: int,
               augment_before_mix: bool) -> tf.data.Dataset:
  """mix_source='stream': pairs consecutive examples and mixes each pair into one."""
  mix = _mix_fn(spec, batch_size, augment_before_mix)

  def mix_pair(pair_index, pair):
    return mix(pair_index, {k: v[0] for k, v in pair.items()}, {k: v[1] for k, v in pair.items()})

  ds = ds.batch(2, drop_remainder=True).enumerate()
  return ds.map(mix_pair, num_parallel_calls=tf.data.AUTOTUNE)


def _mix_within_batches(ds: tf.data.Dataset, spec: AugmentSpec, batch_size: int,
                        augment_before_mix: bool) -> tf.data.Dataset:
  """mix_source='batch': mixes example i of each innermost batch with example
  (i + batch_size // 2) % batch_size of it, so each example is decoded once and is
  also the partner of one other output (with mixup + CutMix, a mixup output's
  partner is a CutMix output's own image and the other way round; in a batch of
  one, an image is its own partner)."""
  shift = batch_size // 2

  def with_partners(batch):
    partner = {k: tf.roll(batch[k], -shift, axis=0) for k in ("images", "labels")}
    return {"a": batch, "b": partner}

  mix = _mix_fn(spec, batch_size, augment_before_mix)
  ds = ds.batch(batch_size, drop_remainder=True).map(with_partners).unbatch().enumerate()
  return ds.map(lambda index, pair: mix(index, pair["a"], pair["b"]),
                num_parallel_calls=tf.data.AUTOTUNE)


def _batch(ds: tf.data.Dataset, dims: tuple[int, ...], spec: AugmentSpec,
           augment_before_mix: bool, mix_source: str, tf_dtype: tf.DType,
           transpose: bool) -> tf.data.Dataset:
  """Batches along `dims` (innermost first), mixing and laying out the innermost batch."""
  if spec.mixes:
    mix = _mix_pairs if mix_source == "stream" else _mix_within_batches
    ds = mix(ds, spec, dims[-1], augment_before_mix)
  ds = ds.batch(dims[-1], drop_remainder=True)

  def finish(batch):
    images = batch["images"]
    if transpose:
      images = tf.transpose(images, (1, 2, 3, 0))  # NHWC -> HWCN
    # Cast last: every op before runs in float32, whatever the output dtype.
    return {**batch, "images": tf.cast(images, tf_dtype)}

  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  for d in reversed(dims[:-1]):
    ds = ds.batch(d, drop_remainder=True)
  return ds
