"""Checks of the manual ImageNet files before TFDS spends hours preparing them.

TFDS's `imagenet2012` builder reads the official ILSVRC2012 archives from its
manual directory (default `<data_dir>/downloads/manual/`):

* `ILSVRC2012_img_train.tar`: one inner tar per class, named by WordNet synset
  (`n01440764.tar`, ...), each holding that class's JPEGs;
* `ILSVRC2012_img_val.tar`: 50,000 JPEGs `ILSVRC2012_val_00000001.JPEG`, ...
  TFDS labels them from the list it ships (`validation_labels.txt`, one synset
  per line in file-name order) by zipping the *sorted* file names with that
  list, so a partial validation archive is labelled correctly only when it
  holds files 1..n without gaps.

TFDS 4.9's builder reads the validation archive's file list even when only
training is wanted, so preparation always needs `ILSVRC2012_img_val.tar`; the
training archive may be missing, and then the prepared dataset has no 'train'. Problems found here are reported with the file and the place it
should go, instead of TFDS's errors deep inside generation.
"""

import os
import re
import tarfile
from typing import Optional

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
SPLIT_ARCHIVES = {"train": TRAIN_TAR, "validation": VAL_TAR}
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_SYNSET_TAR = re.compile(r"^(n\d{8})\.tar$")


def default_manual_dir(data_dir: Optional[str]) -> str:
  """Where TFDS looks for manual files: `<data_dir>/downloads/manual`."""
  import tensorflow_datasets as tfds  # Lazy: only needed to find TFDS's default data_dir.
  root = os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  return os.path.join(os.path.expanduser(root), "downloads", "manual")


def tfds_synsets() -> list[str]:
  """The 1000 class synsets of TFDS's imagenet2012, in label order."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  del tfds
  with open(os.fspath(imagenet_common.label_names_file())) as f:
    return f.read().split()


def missing_archive_message(manual_dir: str, splits: list[str]) -> str:
  """Says which archives to put where, for the splits asked for."""
  names = "\n".join(f"  * {os.path.join(manual_dir, SPLIT_ARCHIVES[s])}  (split {s!r})"
                    for s in splits)
  return (
      f"imagenet2012 is not prepared and its manual files are missing. Download the official "
      f"ILSVRC2012 archives from https://image-net.org/download-images (registration needed) "
      f"and place them, unextracted, at:\n{names}\n"
      f"(or pass manual_dir=... to load). TFDS then converts them once into data_dir.")


def _member_names(path: str) -> list[str]:
  with tarfile.open(path, mode="r:") as tar:
    return [m.name for m in tar.getmembers() if m.isfile()]


def check_train_archive(path: str) -> None:
  """Raises ValueError unless `path` is a tar of `<synset>.tar` files with known synsets."""
  known = set(tfds_synsets())
  names = _member_names(path)
  if not names:
    raise ValueError(f"{path} holds no files; expected one '<synset>.tar' per class, "
                     f"e.g. 'n01440764.tar'.")
  bad = [n for n in names if not (_SYNSET_TAR.match(os.path.basename(n))
                                  and os.path.basename(n)[:-4] in known)]
  if bad:
    raise ValueError(f"{path} should hold only '<synset>.tar' archives of the 1000 ILSVRC2012 "
                     f"classes (e.g. 'n01440764.tar'), but holds {bad[:5]}"
                     f"{' ...' if len(bad) > 5 else ''}.")


def check_val_archive(path: str) -> None:
  """Raises ValueError unless `path` holds ILSVRC2012_val_00000001.JPEG .. _n.JPEG, no gaps."""
  names = sorted(os.path.basename(n) for n in _member_names(path))
  bad = [n for n in names if not _VAL_NAME.match(n)]
  if bad or not names:
    raise ValueError(f"{path} should hold only 'ILSVRC2012_val_%08d.JPEG' images, but holds "
                     f"{bad[:5] if names else 'nothing'}.")
  numbers = [int(_VAL_NAME.match(n).group(1)) for n in names]
  if numbers != list(range(1, len(numbers) + 1)) or len(numbers) > 50000:
    raise ValueError(
        f"{path} holds {len(numbers)} validation images numbered {numbers[0]}..{numbers[-1]} "
        f"with gaps; TFDS labels validation images by position in the sorted list, so they "
        f"must be ILSVRC2012_val_00000001.JPEG .. ILSVRC2012_val_{len(numbers):08d}.JPEG "
        f"(at most 50000) or the labels would be wrong.")


def check_manual_dir(manual_dir: str, splits: list[str]) -> None:
  """Checks the archives the requested `splits` need, plus the validation archive TFDS always reads.

  Raises:
    FileNotFoundError: an archive is missing (the message says where it goes).
    ValueError: an archive's contents do not have the official layout.
  """
  needed = sorted({s for s in splits if s in SPLIT_ARCHIVES} | {"validation"})
  missing = [s for s in needed if not os.path.isfile(os.path.join(manual_dir, SPLIT_ARCHIVES[s]))]
  if missing:
    raise FileNotFoundError(missing_archive_message(manual_dir, missing))
  if "train" in needed:
    check_train_archive(os.path.join(manual_dir, TRAIN_TAR))
  if "validation" in needed:
    check_val_archive(os.path.join(manual_dir, VAL_TAR))
