"""From a dataset name to a stream of (encoded image, label, name) for one process.

Names:
  * 'digits': the embedded scikit-learn digits (`digits.py`), prepared into
    data_dir on first use; no download.
  * 'imagenet2012' (optionally with a version, 'imagenet2012:5.1.0'): TFDS's
    builder over the official manual archives (`imagenet.py` checks them first).
  * 'folder:<path>': a directory of images, `<path>/<split>/<class>/<image>`
    or one `<path>/<class>/<image>` tree, optionally with a held-out part
    (`folder.py`).
  * any other TFDS image-classification dataset, e.g. 'cifar10', 'mnist'.

Images are never decoded here (`SkipDecoding`): the preprocessing decodes each
JPEG only inside its crop window.
"""

import contextlib
import dataclasses
import os
import re
from typing import Iterator, Optional, Union

import filelock
import tensorflow_datasets as tfds
from absl import logging

from nfnets_jax.data import digits as _digits  # noqa: F401  (registers the 'digits' builder)
from nfnets_jax.data import folder, imagenet
from nfnets_jax.data._tf import tf

FOLDER_PREFIX = folder.PREFIX
_NAME_KEYS = ("image/filename", "file_name", "filename", "id")


@dataclasses.dataclass
class Source:
  """A prepared TFDS dataset: its builder and which features hold image, label and name."""
  name: str
  builder: tfds.core.DatasetBuilder
  image_key: str
  label_key: str
  name_key: Optional[str]
  is_folder = False

  @property
  def num_classes(self) -> int:
    return self.builder.info.features[self.label_key].num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    """The label feature's names (str(i) where the dataset names none)."""
    return tuple(self.builder.info.features[self.label_key].names)

  @property
  def split_names(self) -> list[str]:
    return list(self.builder.info.splits.keys())

  def num_examples(self, split: str) -> int:
    """Examples in `split` (which may be sliced, e.g. 'train[10000:]', for TFDS datasets)."""
    self._check_split(split)
    return self.builder.info.splits[split].num_examples

  def _check_split(self, split: str) -> None:
    bases = base_split_names(split)
    if any(s not in self.split_names for s in bases):
      raise ValueError(f"Unknown split {split!r} for dataset {self.name!r}; it has "
                       f"{self.split_names}. Slices such as 'train[:90%]' and unions "
                       "'train+validation' are allowed.")

  def part_sizes(self, split: str, process_count: int) -> list[int]:
    """Examples in each process's part of `split` (they can differ by more than one
    for unions: TFDS splits each member of 'a+b' evenly on its own)."""
    self._check_split(split)
    return [self.builder.info.splits[tfds.split_for_jax_process(
        split, process_index=i, process_count=process_count)].num_examples
            for i in range(process_count)]

  def read(self, split: str, *, process_index: int, process_count: int,
           shuffle_files: bool, seed: Optional[int]) -> tuple[tf.data.Dataset, int]:
    """This process's disjoint part of `split` as {'image': bytes, 'label', 'name'}, and its size.

    The part is TFDS's even split (contiguous ranges; the first N % P
    processes get one example more).
    """
    size = self.part_sizes(split, process_count)[process_index]
    decoders = {self.image_key: tfds.decode.SkipDecoding()}
    part = tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count)
    read_config = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=self.name_key is None)
    ds = self.builder.as_dataset(split=part, shuffle_files=shuffle_files, decoders=decoders,
                                 read_config=read_config)
    name_key = self.name_key or "tfds_id"
    image_key, label_key = self.image_key, self.label_key

    def select(ex):
      return {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32),
              "name": tf.strings.as_string(ex[name_key]) if ex[name_key].dtype != tf.string
              else ex[name_key]}

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    return ds, size


def base_split_names(split: str) -> list[str]:
  """'train[:10%]+validation' -> ['train', 'validation']."""
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in str(split).split("+")]


def _builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise ValueError(
        f"Unknown dataset {name!r}. Use 'digits' (embedded, no download), 'imagenet2012' "
        f"(manual ILSVRC2012 archives), 'folder:<path>' (an image folder) or any TFDS image "
        f"classification dataset name. TFDS said: {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def _preparation_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds a file lock beside the dataset's directory while it is prepared.

  Every process of a multi-process job opens its sources, and on a fresh
  data_dir that several of them share (one host's processes, or a shared
  filesystem) each would prepare the dataset at once: TFDS then fails to
  rename the second copy into place (FileExistsError), and that process's
  peers time out waiting for it. With the lock, one process prepares and
  the others wait, then read what it wrote. Object stores (gs://...) have no
  file locks; there nothing is locked.
  """
  root = str(builder.data_dir_root)
  if "://" in root:
    yield
    return
  os.makedirs(root, exist_ok=True)
  lock = filelock.FileLock(os.path.join(root, f".{builder.name}.prepare.lock"))
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    logging.info("Waiting for another process to finish preparing %s in %s.", builder.name, root)
    lock.acquire()
  try:
    yield
  finally:
    lock.release()


def _prepare(builder: tfds.core.DatasetBuilder, name: str, data_dir: Optional[str], split: str,
             manual_dir: Optional[str], download: bool) -> tfds.core.DatasetBuilder:
  """A builder over the dataset prepared in its data_dir (checking manual files first),
  by this process or by another one while this one waited for the lock."""
  if builder.is_prepared():
    return builder
  with _preparation_lock(builder):
    # A builder made before the dataset existed describes no splits, so one
    # made now reads what another process may have prepared meanwhile.
    builder = _builder(name, data_dir)
    if builder.is_prepared():
      return builder
    is_imagenet = builder.name == "imagenet2012"
    if is_imagenet:
      manual_dir = manual_dir or imagenet.default_manual_dir(str(builder.data_dir_root))
      wanted = [s for s in base_split_names(split) if s in imagenet.SPLIT_ARCHIVES]
      present = [s for s, f in imagenet.SPLIT_ARCHIVES.items()
                 if os.path.isfile(os.path.join(manual_dir, f))]
      imagenet.check_manual_dir(manual_dir, sorted(set(wanted) | set(present)))
    elif not download and builder.name != "digits":
      raise FileNotFoundError(f"Dataset {name!r} is not prepared in {builder.data_dir_root} and "
                              f"download=False.")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
  return builder


def _feature_keys(builder: tfds.core.DatasetBuilder, name: str) -> tuple[str, str, Optional[str]]:
  features = builder.info.features
  keys = builder.info.supervised_keys
  image_key, label_key = (keys if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys)
                          else ("image", "label"))
  if (image_key not in features or not isinstance(features[image_key], tfds.features.Image)
      or label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel)):
    raise ValueError(f"Dataset {name!r} is not an image classification dataset: it needs an "
                     f"Image feature and a ClassLabel feature (supervised keys {keys!r}, "
                     f"features {list(features.keys())}).")
  name_key = next((k for k in _NAME_KEYS if k in features), None)
  return image_key, label_key, name_key


AnySource = Union[Source, folder.FolderSource]


def open_source(name: str, split: str, *, data_dir: Optional[str] = None,
                manual_dir: Optional[str] = None, download: bool = True,
                val_fraction: float = 0.0) -> AnySource:
  """Resolves `name`, preparing the dataset in `data_dir` if needed, and checks `split`.

  `val_fraction` > 0 holds out part of a single-tree image folder as its
  'validation' split (`folder.py`); other datasets take slices instead.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"Dataset name must be a non-empty string, got {name!r}")
  if name.startswith(FOLDER_PREFIX):
    source = folder.open_folder(name, val_fraction)
    source.num_examples(split)
    return source
  if val_fraction:
    raise ValueError(f"val_fraction={val_fraction} applies to 'folder:<path>' datasets only; "
                     f"hold out part of {name!r} with a split slice such as 'train[:10%]'.")
  builder = _prepare(_builder(name, data_dir), name, data_dir, split, manual_dir, download)
  image_key, label_key, name_key = _feature_keys(builder, name)
  source = Source(name=name, builder=builder, image_key=image_key, label_key=label_key,
                  name_key=name_key)
  try:
    source.num_examples(split)
  except ValueError:
    if source.builder.name == "imagenet2012":
      missing = [s for s in base_split_names(split) if s not in source.split_names]
      raise ValueError(
          f"imagenet2012 in {source.builder.data_dir} was prepared without split(s) {missing}: "
          f"its archive was missing then. Put "
          f"{[imagenet.SPLIT_ARCHIVES.get(s, s) for s in missing]} in the manual directory, "
          f"delete {source.builder.data_dir} and load again.") from None
    raise
  return source
