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

import dataclasses
import gc
import logging
import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from nfnets_jax.data import mixing, preprocess, randaugment, rng, sharding, subsets
from nfnets_jax.data._tf import tf
from nfnets_jax.data.augment_spec import AugmentSpec
from nfnets_jax.data.integrity import SkippedFiles, attempt
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
    self._closed = False

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
    if self._closed:
      raise StopIteration
    if self._iterator is None:
      self._iterator = self.dataset.as_numpy_iterator()
    try:
      batch = next(self._iterator)
    except tf.errors.OpError:
      # Raised inside tf.data, the error arrives wrapped in a TensorFlow one.
      if self._skipped.error is None:
        raise
    else:
      self.step += 1
      return batch
    self.close()
    raise self._skipped.error

  def close(self) -> None:
    """Ends the stream's tf.data threads now; it yields nothing more. Left to
    the interpreter's exit (an exception's traceback keeps the iterator alive until
    then), the iterator would be destroyed while a thread waits for the GIL to report
    a skipped file (`SkippedFiles`), which it can no longer take then: the exit hangs."""
    self._closed = True
    self._iterator = None
    gc.collect()

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
    UnreadableSplitError (a ValueError), while iterating a training stream: no
      file of this process's part of the split could be read as an image.
  """
  for group, value in zip(GROUPS, (preprocessing, augmentation, stream, reading)):
    _check_group(group, value)
  plan = _plan(is_training, batch_dims, preprocessing, augmentation, stream)
  if reading.fake_data:
    return _fake(plan, stream.start_step, preprocessing.transpose)
  source = _open(name, split, reading)
  ds, num_local = source.read(split, process_index=plan.process_index,
                              process_count=plan.process_count, shuffle_files=is_training,
                              seed=plan.seed if plan.deterministic else None)
  # Only an endless training stream would wait forever on a part with no readable file;
  # an evaluation ends, and its caller sees it scored nothing (other processes' parts may
  # hold every readable file: an error here would leave them waiting in collectives).
  skipped = SkippedFiles(num_local if is_training else None, _describe_part(name, split, plan))
  if is_training:
    ds, steps = _training_examples(ds, num_local, plan, preprocessing, augmentation, stream,
                                   reading, skipped, source.is_folder), None
  else:
    steps = sharding.eval_steps(source.part_sizes(split, plan.process_count),
                                plan.per_process_batch)
    ds = _eval_examples(ds, steps, plan, preprocessing, skipped, source.is_folder)
  ds = _batch(ds, plan.dims, plan.spec if plan.mixes else AugmentSpec(),
              augmentation.augment_before_mix, augmentation.mix_source, plan.tf_dtype,
              preprocessing.transpose, preprocessing.normalization)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  ds = ds.with_options(_options(plan.deterministic or not is_training, reading.num_threads,
                                reading.autotune))
  return Batches(ds, step=stream.start_step, steps=steps, num_examples=num_local,
                 num_classes=source.num_classes, skipped=skipped)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The checked settings `build` works from."""
  is_training: bool
  dims: tuple[int, ...]
  size: tuple[int, int]
  tf_dtype: tf.DType
  spec: AugmentSpec
  mixes: bool
  seed: Optional[int]
  deterministic: bool
  process_index: int
  process_count: int

  @property
  def per_process_batch(self) -> int:
    return math.prod(self.dims)


def _plan(is_training: bool, batch_dims: Sequence[int], preprocessing: Preprocessing,
          augmentation: Augmentation, stream: Stream) -> _Plan:
  """Checks the arguments that depend on each other; the message says what would be valid."""
  dims = _check_batch_dims(batch_dims)
  index, count = sharding.resolve_process(stream.process_index, stream.process_count)
  if stream.start_step and not is_training:
    raise ValueError("start_step only applies to training; evaluation always starts at its "
                     "first batch.")
  spec = augmentation.spec
  mixes = is_training and spec.mixes
  if mixes and spec.mixup and spec.cutmix and dims[-1] % 2:
    raise ValueError(f"{augmentation.augment_name!r} mixes half of each batch with mixup and "
                     f"half with CutMix, so the innermost batch dimension must be even; got "
                     f"batch_dims {dims}.")
  deterministic = stream.is_deterministic
  if deterministic and stream.seed is None and is_training:
    raise ValueError("deterministic=True needs a seed: the file order, shuffle and augmentations "
                     "of a reproducible run all derive from it (pass seed=<int>).")
  return _Plan(is_training=is_training, dims=dims, size=preprocessing.size_hw,
               tf_dtype=_tf_dtype(preprocessing.dtype), spec=spec, mixes=mixes,
               seed=stream.seed, deterministic=deterministic, process_index=index,
               process_count=count)


def _fake(plan: _Plan, start_step: int, transpose: bool) -> Batches:
  """Constant batches of the real shapes and dtypes, without reading any dataset."""
  np_dtype = np.dtype(plan.tf_dtype.as_numpy_dtype)
  return Batches(None, step=start_step, steps=None if plan.is_training else 1, num_examples=0,
                 num_classes=0, skipped=SkippedFiles(),
                 fake_batches=_fake_batches(plan.dims, plan.size, np_dtype, transpose,
                                            plan.is_training, plan.mixes))


def _open(name: str, split: str, reading: Reading):
  """The dataset's source, restricted to the classes and examples `reading` asks for."""
  return subsets.restrict(
      open_source(name, split, data_dir=reading.data_dir, manual_dir=reading.manual_dir,
                  download=reading.download, val_fraction=reading.val_fraction),
      reading.classes, reading.examples_per_class)


def _describe_part(name: str, split: str, plan: _Plan) -> str:
  """How errors name the files this process reads: '<name> split <split>' and its part."""
  part = (f" (process {plan.process_index}'s part of {plan.process_count})"
          if plan.process_count > 1 else "")
  return f"{name} split {split!r}{part}"


def _training_examples(ds: tf.data.Dataset, num_local: int, plan: _Plan,
                       preprocessing: Preprocessing, augmentation: Augmentation, stream: Stream,
                       reading: Reading, skipped: SkippedFiles,
                       is_folder: bool) -> tf.data.Dataset:
  """The endless, shuffled stream of preprocessed training examples (not yet batched)."""
  examples_per_step = plan.per_process_batch * (
      2 if plan.mixes and augmentation.mix_source == "stream" else 1)
  if reading.cache if reading.cache is not None else plan.process_count > 1:
    ds = ds.cache()
  ds = ds.repeat()
  # A buffer beyond one epoch of this process's part would only re-read the same files.
  buffer = stream.shuffle_buffer or max(
      1, min(max(MIN_SHUFFLE_BUFFER, 10 * examples_per_step), num_local))
  ds = ds.shuffle(buffer, seed=plan.seed if plan.deterministic else None,
                  reshuffle_each_iteration=True)
  ds = ds.enumerate().filter(lambda i, ex: skipped.keep(ex["image"], ex["name"]))
  if stream.start_step and plan.deterministic:
    # Exact resume: replay the stream's reads (no decoding) up to where step k began.
    # A fast-mode stream is random anyway, so it starts afresh instead of paying this.
    ds = ds.skip(stream.start_step * examples_per_step)
  example_fn = _train_example_fn(plan.spec, plan.size, rng.run_seed(plan.seed, plan.process_index),
                                 plan.mixes, augmentation.augment_before_mix,
                                 preprocessing.train_preproc, preprocessing.normalization)
  return _map_examples(ds, example_fn, skipped, is_folder)


def _eval_examples(ds: tf.data.Dataset, steps: int, plan: _Plan, preprocessing: Preprocessing,
                   skipped: SkippedFiles, is_folder: bool) -> tf.data.Dataset:
  """One ordered pass of preprocessed examples, masked padding to `steps` full batches."""
  ds = ds.enumerate().filter(lambda i, ex: skipped.keep(ex["image"], ex["name"]))
  eval_preproc, size = preprocessing.eval_preproc, plan.size
  ds = _map_examples(ds, lambda i, ex: {
      "images": preprocess.normalize(preprocess.eval_image(ex["image"], size, eval_preproc),
                                     preprocessing.normalization),
      "labels": ex["label"], "mask": tf.constant(1, tf.int32)}, skipped, is_folder)
  padding = tf.data.Dataset.from_tensors({
      "images": tf.zeros(size + (3,), tf.float32), "labels": tf.constant(0, tf.int32),
      "mask": tf.constant(0, tf.int32)}).repeat()
  return ds.concatenate(padding).take(steps * plan.per_process_batch)


def _map_examples(ds: tf.data.Dataset, example_fn, skipped: SkippedFiles,
                  is_folder: bool) -> tf.data.Dataset:
  """`example_fn` over (stream position, example); for folders each example is decoded
  in a guard of its own, so a file its decoder refuses is reported and dropped
  (prepared TFDS datasets were validated when written)."""
  if not is_folder:
    return ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(_guarded(example_fn), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.filter(lambda out, ok, name: skipped.keep_if(ok, name))
  return ds.map(lambda out, ok, name: out)


def _guarded(example_fn):
  """(position, example) -> (example_fn's output, whether it worked, the file's name)."""
  def fn(index, ex):
    out, ok = attempt(example_fn, index, ex)
    return out, ok, ex["name"]

  return fn


def _augment_normalize(image: tf.Tensor, spec: AugmentSpec, seed: tf.Tensor,
                       normalization: str) -> tf.Tensor:
  if spec.randaugment:
    image = randaugment.randaugment_float(image, spec.randaugment_layers,
                                          spec.randaugment_magnitude, seed)
  return preprocess.normalize(image, normalization)


def _train_example_fn(spec: AugmentSpec, size: tuple[int, int], key: tf.Tensor, mixes: bool,
                      augment_before_mix: bool, train_preproc: str, normalization: str):
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
      out["images"] = _augment_normalize(image, spec, augment_seed, normalization)
    return out

  return fn


def _mix_fn(spec: AugmentSpec, batch_size: int, augment_before_mix: bool, normalization: str):
  """(output position, example, its partner) -> the mixed output (`mixing.py`),
  RandAugment-ed once here unless each example was before mixing."""
  def mix(index, a, b):
    out = mixing.mix_pair(spec, a, b, a["mix_seed"], mixing.uses_cutmix(spec, index, batch_size))
    if not augment_before_mix:
      out["images"] = _augment_normalize(out["images"], spec, a["augment_seed"], normalization)
    return out

  return mix


def _mix_pairs(ds: tf.data.Dataset, spec: AugmentSpec, batch_size: int,
               augment_before_mix: bool, normalization: str) -> tf.data.Dataset:
  """mix_source='stream': pairs consecutive examples and mixes each pair into one."""
  mix = _mix_fn(spec, batch_size, augment_before_mix, normalization)

  def mix_pair(pair_index, pair):
    return mix(pair_index, {k: v[0] for k, v in pair.items()}, {k: v[1] for k, v in pair.items()})

  ds = ds.batch(2, drop_remainder=True).enumerate()
  return ds.map(mix_pair, num_parallel_calls=tf.data.AUTOTUNE)


def _mix_within_batches(ds: tf.data.Dataset, spec: AugmentSpec, batch_size: int,
                        augment_before_mix: bool, normalization: str) -> tf.data.Dataset:
  """mix_source='batch': mixes example i of each innermost batch with example
  (i + batch_size // 2) % batch_size of it, so each example is decoded once and is
  also the partner of one other output (with mixup + CutMix, a mixup output's
  partner is a CutMix output's own image and the other way round; in a batch of
  one, an image is its own partner)."""
  shift = batch_size // 2

  def with_partners(batch):
    partner = {k: tf.roll(batch[k], -shift, axis=0) for k in ("images", "labels")}
    return {"a": batch, "b": partner}

  mix = _mix_fn(spec, batch_size, augment_before_mix, normalization)
  ds = ds.batch(batch_size, drop_remainder=True).map(with_partners).unbatch().enumerate()
  return ds.map(lambda index, pair: mix(index, pair["a"], pair["b"]),
                num_parallel_calls=tf.data.AUTOTUNE)


def _batch(ds: tf.data.Dataset, dims: tuple[int, ...], spec: AugmentSpec,
           augment_before_mix: bool, mix_source: str, tf_dtype: tf.DType,
           transpose: bool, normalization: str) -> tf.data.Dataset:
  """Batches along `dims` (innermost first), mixing and laying out the innermost batch."""
  if spec.mixes:
    mix = _mix_pairs if mix_source == "stream" else _mix_within_batches
    ds = mix(ds, spec, dims[-1], augment_before_mix, normalization)
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
