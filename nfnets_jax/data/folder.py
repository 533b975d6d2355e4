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
import logging
import os
import random
from typing import Optional

from nfnets_jax.data._tf import tf
from nfnets_jax.data.integrity import attempt
from nfnets_jax.data.options import check_val_fraction
from nfnets_jax.data.sharding import shard_sizes

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
HELD_OUT_SPLIT = "validation"
#: Split folders read when 'validation' is asked for and the tree has none, in order.
VALIDATION_ALIASES = ("val", "test")
_LAYOUTS = "<folder>/<split>/<class>/<image>.jpg or <folder>/<class>/<image>.jpg"
_log = logging.getLogger(__name__)


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
    ds = ds.map(lambda ex: {"image": _read(ex["name"]), "label": ex["label"],
                            "name": ex["name"]}, num_parallel_calls=tf.data.AUTOTUNE)
    return ds, size


def _read(name: tf.Tensor) -> tf.Tensor:
  """The file's bytes; empty where it cannot be read (removed since the scan, no
  permission), which the pipeline's checks then report by name as unreadable."""
  return attempt(tf.io.read_file, name)[0]


@dataclasses.dataclass(frozen=True)
class _Listing:
  """One directory's image files and sub-folders (names, sorted; '.' names left out)."""
  images: tuple[str, ...]
  folders: tuple[str, ...]


def _list(path: str) -> _Listing:
  """Lists `path` once; only entries without an image extension are checked for being
  folders (a class folder of a million images costs one listing)."""
  names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(path) if not n.startswith("."))
  images = tuple(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
  folders = tuple(n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)
                  and tf.io.gfile.isdir(os.path.join(path, n)))
  return _Listing(images, folders)


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
  """Scans the folder `name` ('folder:<path>') names; errors say what layout was expected.

  Logs a warning for what the layout leaves out or finds empty: image files
  beside the class folders (a stray image in `train/`), images in folders
  nested inside a class folder, class folders without images.
  """
  path = _folder_path(name)
  check_val_fraction(val_fraction)
  root = _list(path)
  if root.images:
    _log.warning("Image folder %s: %d image(s) directly inside it are not read (%s); images "
                 "go in class folders, %s.", path, len(root.images),
                 _examples({".": root.images}), _LAYOUTS)
  top = {d: _list(os.path.join(path, d)) for d in root.folders}
  second = {d: {c: _list(os.path.join(path, d, c)) for c in listing.folders}
            for d, listing in top.items()}
  flat = _is_single_tree(path, top, second)
  if flat:
    trees = {"train": path}
    by_split = {"train": _classes(path, top, second)}
  else:
    if val_fraction:
      raise ValueError(f"val_fraction={val_fraction} holds out part of a single class-folder "
                       f"tree, but {path!r} already has split folders {sorted(top)}; set it "
                       "to 0.")
    trees = {split: os.path.join(path, split) for split in top}
    by_split = {split: _classes(tree, second[split], {
        c: {sub: _list(os.path.join(tree, c, sub)) for sub in listing.folders}
        for c, listing in second[split].items()}) for split, tree in trees.items()}
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


def _folder_path(name: str) -> str:
  """The directory 'folder:<path>' names, absolute; an error unless it is one."""
  path = name[len(PREFIX):]
  if not path.strip():
    raise ValueError(f"Dataset {name!r} names no folder: write 'folder:<path>', with {_LAYOUTS}.")
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  if not tf.io.gfile.isdir(path):
    if tf.io.gfile.exists(path):
      raise ValueError(f"Image folder {path!r} is a file, not a folder; 'folder:<path>' names "
                       f"the folder that holds the images, as {_LAYOUTS}.")
    raise FileNotFoundError(f"Image folder {path!r} does not exist; expected {_LAYOUTS}.")
  return path


def _is_single_tree(path: str, top: dict[str, _Listing],
                    second: dict[str, dict[str, _Listing]]) -> bool:
  """Whether `path` is one `<class>/<image>` tree (else `<split>/<class>/<image>`): where
  most of the images are. Images at the other depth are named in a warning."""
  beside = {d: listing.images for d, listing in top.items() if listing.images}
  num_beside = sum(map(len, beside.values()))
  num_below = sum(len(listing.images) for folders in second.values()
                  for listing in folders.values())
  if num_beside and num_beside == num_below:
    raise ValueError(
        f"Image folder {path!r} has as many images directly in its sub-folders ({num_beside}, "
        f"e.g. {_examples(beside)}) as one level deeper ({num_below}): it is not clear whether "
        f"they are classes or splits. Expected {_LAYOUTS}; move the images that do not fit.")
  if num_below > num_beside:
    if beside:
      _log.warning("Image folder %s is read as <split>/<class>/<image>: %d image(s) directly "
                   "inside split folders are not read (%s).", path, num_beside,
                   _examples(beside))
    return False
  return True


def _classes(tree: str, listings: dict[str, _Listing],
             nested: dict[str, dict[str, _Listing]]) -> dict[str, tuple[str, ...]]:
  """Each class folder's images (`listings`); warns of class folders without images and of
  images in the folders `nested` inside class folders (neither is read)."""
  empty = [c for c, listing in listings.items() if not listing.images]
  if empty:
    _log.warning("Class folder(s) without %s images in %s: %s. Each is still a class "
                 "(a label) but has no example here.", "/".join(IMAGE_EXTENSIONS), tree,
                 ", ".join(empty))
  deeper = {f"{c}/{sub}": listing.images for c, folders in nested.items()
            for sub, listing in folders.items() if listing.images}
  if deeper:
    _log.warning("Images in folders nested inside class folders of %s are not read: %d "
                 "(%s); a class's images sit directly in its folder.", tree,
                 sum(map(len, deeper.values())), _examples(deeper))
  return {c: listing.images for c, listing in listings.items()}


def _examples(images: dict[str, tuple[str, ...]], limit: int = 3) -> str:
  """'train/a.jpg, val/b.png and 4 more': a few of the images, by folder."""
  paths = [f"{where}/{image}" for where, names in images.items() for image in names]
  more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more
