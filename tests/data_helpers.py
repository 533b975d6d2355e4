"""Shared fixtures and builders for the input-pipeline tests (tests/test_data_*.py).

Kept out of conftest.py so that the model and optimizer tests never import
TensorFlow: only the data tests import this module. Datasets are built once per
test session (per xdist worker) in temporary directories, through real TFDS
preparation.
"""

import io
import os
import tarfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Quieter C++ logs in test output.

import numpy as np
import pytest
from PIL import Image

TRAIN_SYNSETS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark
TRAIN_PER_CLASS = 4
NUM_VAL = 7


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def random_image(seed: int, height: int = 30, width: int = 40) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_train_tar(path: str, synsets=TRAIN_SYNSETS, per_class: int = TRAIN_PER_CLASS) -> None:
  """The official layout: an outer tar holding one '<synset>.tar' of JPEGs per class."""
  with tarfile.open(path, "w") as outer:
    for k, synset in enumerate(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for j in range(per_class):
          _add(tar, f"{synset}_{j}.JPEG", encode(random_image(100 * k + j)))
      _add(outer, f"{synset}.tar", inner.getvalue())


def write_val_tar(path: str, numbers) -> None:
  """Validation JPEGs named like the official ones: ILSVRC2012_val_00000001.JPEG, ..."""
  with tarfile.open(path, "w") as tar:
    for i in numbers:
      _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", encode(random_image(10_000 + i)))


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with the embedded digits dataset prepared in it."""
  import tensorflow_datasets as tfds
  from nfnets_jax.data import digits  # noqa: F401  (registers the builder)
  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
  tfds.builder("digits", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope="session")
def mini_imagenet(tmp_path_factory) -> dict:
  """Manual ILSVRC2012 archives (3 real synsets, 7 validation images) and an empty data_dir."""
  root = tmp_path_factory.mktemp("mini_imagenet")
  manual = root / "manual"
  manual.mkdir()
  write_train_tar(str(manual / "ILSVRC2012_img_train.tar"))
  write_val_tar(str(manual / "ILSVRC2012_img_val.tar"), range(1, NUM_VAL + 1))
  return {"manual_dir": str(manual), "data_dir": str(root / "data")}


def write_folder(root, classes: dict, fmt: str = "JPEG", seed: int = 0) -> list[str]:
  """Writes `classes` = {name: count} images under root/<class>/; returns the file paths."""
  paths = []
  for k, (label, count) in enumerate(sorted(classes.items())):
    os.makedirs(os.path.join(root, label), exist_ok=True)
    for j in range(count):
      ext = "jpg" if fmt == "JPEG" else "png"
      path = os.path.join(root, label, f"img_{j}.{ext}")
      with open(path, "wb") as f:
        f.write(encode(random_image(seed + 100 * k + j, 24, 20), fmt))
      paths.append(path)
  return paths
