"""'folder:<path>' datasets: class folders of image files, read with tf.data.

Two layouts:
  * `<path>/<split>/<class>/<image>`: the splits are the sub-folders (`train`,
    `val`, `test` ...); asked for 'validation', a tree without a `validation/`
    folder gives its `val/` (else `test/`).
  * `<path>/<class>/<image>`: one tree, the split 'train'; with
    `val_fraction` > 0 a deterministic held-out part of each class is the
    split 'validation' and the rest 'train'.

Class names are the sorted names of the class folders (of all splits
together), label i the i-th; images are the `.jpg`, `.jpeg` and `.png` files
(any case); folders and files whose name starts with '.' are left out. Within
a split the files are in TFDS `ImageFolder`'s order (sorted by class, then
name, then shuffled by a generator seeded with the split's name), so a run
reads the same files in the same order as it did through `ImageFolder`.

Why not `tfds.ImageFolder` itself: it has no held-out split (nor any
sub-split), and it reads every file before a per-process `shard` could drop
it, so each of P processes would read the whole folder. Here the file list is
sharded first and each process opens only its own files.
"""

import dataclasses
import hashlib
import os
import random
from typing import Optional

from nfnets_jax.data._tf import tf
from nfnets_jax.data.options import check_val_fraction
from nfnets_jax.data.sharding import shard_sizes

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
HELD_OUT_SPLIT = "validation"
#: Split folders read when 'validation' is asked for and the tree has none, in order.
VALIDATION_ALIASES = ("val", "test")
_LAYOUTS = "<folder>/<split>/<class>/<image>.jpg or <folder>/<class>/<image>.jpg"


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """A scanned image folder: its classes and, per split, its (file, label) list in read order."""
  name: str
  class_names: tuple[str, ...]
  splits: dict[str, tuple[tuple[str, int], ...]]
  is_folder = True

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def split_names(self) -> list[str]:
    return list(self.splits)

  def resolve_split(self, split: str) -> str:
    """The split folder that `split` reads: itself, or for 'validation' its alias."""
    if split in self.splits:
      return split
    if split == HELD_OUT_SPLIT:
      for alias in VALIDATION_ALIASES:
        if alias in self.splits:
          return alias
    raise ValueError(f"Unknown split {split!r} for dataset {self.name!r}; it has "
                     f"{self.split_names}. Folder datasets take whole split names only.")

  def num_examples(self, split: str) -> int:
    return len(self.splits[self.resolve_split(split)])

  def part_sizes(self, split: str, process_count: int) -> list[int]:
    return shard_sizes(self.num_examples(split), process_count)

  def read(self, split: str, *, process_index: int, process_count: int,
           shuffle_files: bool, seed: Optional[int]) -> tuple[tf.data.Dataset, int]:
    """This process's files of `split` (every `process_count`-th) as {'image': bytes,
    'label', 'name': the file's path}, and how many. Only these files are opened."""
    files = self.splits[self.resolve_split(split)]
    size = self.part_sizes(split, process_count)[process_index]
    ds = tf.data.Dataset.from_tensor_slices({
        "name": tf.constant([path for path, _ in files], tf.string),
        "label": tf.constant([label for _, label in files], tf.int32)})
    ds = ds.shard(process_count, process_index)
    if shuffle_files:
      ds = ds.shuffle(max(size, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda ex: {"image": tf.io.read_file(ex["name"]), "label": ex["label"],
                            "name": ex["name"]}, num_parallel_calls=tf.data.AUTOTUNE)
    return ds, size


def _folders(path: str) -> list[str]:
  return sorted(d for d in tf.io.gfile.listdir(path)
                if not d.startswith(".") and tf.io.gfile.isdir(os.path.join(path, d)))


def _images(path: str) -> list[str]:
  return sorted(f for f in tf.io.gfile.listdir(path)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))


def held_out(files: list[str], fraction: float) -> set[str]:
  """The `round(fraction * len(files))` names of one class whose SHA-256 is smallest.

  A file's place depends only on its own name and its class's other names, so
  the split is the same on every machine and run, and files added to other
  classes change nothing here.
  """
  count = round(fraction * len(files))
  ranked = sorted(files, key=lambda f: hashlib.sha256(f.encode("utf-8")).hexdigest())
  return set(ranked[:count])


def _ordered(split: str, examples: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
  # ImageFolder's order: sorted, then shuffled by a generator seeded with the split name.
  random.Random(split).shuffle(examples)
  return tuple(examples)


def open_folder(name: str, val_fraction: float = 0.0) -> FolderSource:
  """Scans the folder `name` ('folder:<path>') names; errors say what layout was expected."""
  path = name[len(PREFIX):]
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  if not tf.io.gfile.isdir(path):
    raise FileNotFoundError(f"Image folder {path!r} does not exist; expected {_LAYOUTS}.")
  check_val_fraction(val_fraction)
  top = _folders(path)
  flat = any(_images(os.path.join(path, d)) for d in top)
  if flat:
    trees = {"train": path}
  else:
    if val_fraction:
      raise ValueError(f"val_fraction={val_fraction} holds out part of a single class-folder "
                       f"tree, but {path!r} already has split folders {top}; set it to 0.")
    trees = {split: os.path.join(path, split) for split in top}
  by_split = {split: {c: _images(os.path.join(tree, c)) for c in _folders(tree)}
              for split, tree in trees.items()}
  class_names = tuple(sorted({c for classes in by_split.values() for c in classes}))
  if not class_names or not any(f for classes in by_split.values() for f in classes.values()):
    raise ValueError(f"Image folder {path!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images in "
                     f"class folders; expected {_LAYOUTS}.")
  label = {c: i for i, c in enumerate(class_names)}
  splits: dict[str, list[tuple[str, int]]] = {}
  for split, classes in by_split.items():
    for c, files in classes.items():
      out = held_out(files, val_fraction) if flat and val_fraction else set()
      for f in files:
        target = HELD_OUT_SPLIT if f in out else split
        splits.setdefault(target, []).append((os.path.join(trees[split], c, f), label[c]))
  if flat and val_fraction and HELD_OUT_SPLIT not in splits:
    raise ValueError(f"val_fraction={val_fraction} holds out no image of {path!r} (each class "
                     f"keeps round(val_fraction x its images)); raise it.")
  return FolderSource(name=name, class_names=class_names,
                      splits={s: _ordered(s, splits[s]) for s in sorted(splits)})
