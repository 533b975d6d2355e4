"""imagenet2012 through TFDS's real builder, from miniature archives in the official layout.

TFDS's builder does not need the full 1000 classes or 50,000 validation images:
it labels training images by their inner tar's synset, and validation images by
zipping the sorted file names with the label list it ships, so files
ILSVRC2012_val_00000001..7.JPEG get the first seven labels of that list.
"""

import collections
import os

import numpy as np
import pytest

from data_helpers import (NUM_VAL, TRAIN_PER_CLASS, TRAIN_SYNSETS, mini_imagenet,  # noqa: F401
                          write_train_tar, write_val_tar)

tfds = pytest.importorskip("tensorflow_datasets")

from nfnets_jax.data import imagenet, load  # noqa: E402


def _tfds_file(name):
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  path = imagenet_common.label_names_file() if name == "labels" else tfds.core.tfds_path(
      imagenet_common._VALIDATION_LABELS_FNAME)
  with open(os.fspath(path)) as f:
    return f.read().split()


@pytest.fixture(scope="module")
def prepared(mini_imagenet):
  """Validation batches from a first load, which runs TFDS's preparation."""
  batches = load("imagenet2012", "validation", is_training=False, batch_dims=(2, 2),
                 image_size=32, data_dir=mini_imagenet["data_dir"],
                 manual_dir=mini_imagenet["manual_dir"])
  return batches, list(batches)


def test_validation_labels_come_from_tfds_label_list(prepared):
  batches, batch_list = prepared
  synsets = _tfds_file("labels")
  expected = collections.Counter(synsets.index(s) for s in _tfds_file("validation")[:NUM_VAL])
  got = collections.Counter()
  for batch in batch_list:
    assert batch["images"].shape == (2, 2, 32, 32, 3)
    got.update(batch["labels"][batch["mask"] == 1].tolist())
  assert got == expected
  assert batches.num_classes == 1000 and batches.num_examples == NUM_VAL
  assert len(batch_list) == len(batches) == -(-NUM_VAL // 4)  # ceil: padded, not dropped


def test_train_split_labels_are_the_synsets_of_the_inner_tars(prepared, mini_imagenet):
  del prepared  # Ensures preparation happened.
  builder = tfds.builder("imagenet2012", data_dir=mini_imagenet["data_dir"])
  assert builder.info.splits["train"].num_examples == len(TRAIN_SYNSETS) * TRAIN_PER_CLASS
  rows = list(tfds.as_numpy(builder.as_dataset(split="train")))
  synsets = _tfds_file("labels")
  for row in rows:
    synset = row["file_name"].decode().split("_")[0]
    assert row["label"] == synsets.index(synset)


def test_training_batches_with_mixing_from_imagenet(prepared, mini_imagenet):
  del prepared
  batches = load("imagenet2012", "train", is_training=True, batch_dims=(4,), image_size=24,
                 augment_name="cutmix_mixup_randaugment_405", seed=3,
                 data_dir=mini_imagenet["data_dir"], manual_dir=mini_imagenet["manual_dir"])
  valid = {_tfds_file("labels").index(s) for s in TRAIN_SYNSETS}
  for _ in range(3):
    batch = next(batches)
    assert batch["images"].shape == (4, 24, 24, 3)
    assert set(batch["labels"].tolist()) <= valid and set(batch["mix_labels"].tolist()) <= valid
    assert np.all((batch["ratio"] >= 0) & (batch["ratio"] <= 1))


def test_missing_archives_error_names_files_and_where_they_go(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with pytest.raises(FileNotFoundError) as err:
    load("imagenet2012", "validation", is_training=False, batch_dims=(2,), image_size=32,
         data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  message = str(err.value)
  assert os.path.join(str(manual), "ILSVRC2012_img_val.tar") in message
  assert "image-net.org" in message


def test_default_manual_dir_is_under_data_dir(tmp_path):
  data_dir = str(tmp_path / "data")
  with pytest.raises(FileNotFoundError) as err:
    load("imagenet2012", "train", is_training=True, batch_dims=(2,), image_size=32,
         data_dir=data_dir)
  assert os.path.join(data_dir, "downloads", "manual", "ILSVRC2012_img_train.tar") in str(err.value)


def test_validation_archive_with_gaps_is_refused(tmp_path):
  path = str(tmp_path / "ILSVRC2012_img_val.tar")
  write_val_tar(path, [1, 2, 5])
  with pytest.raises(ValueError, match="ILSVRC2012_val_00000003.JPEG|gaps"):
    imagenet.check_val_archive(path)


def test_train_archive_with_unknown_synset_is_refused(tmp_path):
  path = str(tmp_path / "ILSVRC2012_img_train.tar")
  write_train_tar(path, synsets=("n01440764", "n99999999"), per_class=1)
  with pytest.raises(ValueError, match="n99999999.tar"):
    imagenet.check_train_archive(path)


def test_training_needs_the_validation_archive_too(tmp_path):
  # TFDS's builder reads the validation archive's names even to prepare 'train' alone.
  manual = tmp_path / "manual"
  manual.mkdir()
  write_train_tar(str(manual / "ILSVRC2012_img_train.tar"), per_class=1)
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar"):
    load("imagenet2012", "train", is_training=True, batch_dims=(2,), image_size=16,
         data_dir=str(tmp_path / "data"), manual_dir=str(manual))


def test_split_missing_from_preparation_is_explained(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_val_tar(str(manual / "ILSVRC2012_img_val.tar"), [1, 2])
  kwargs = dict(batch_dims=(2,), image_size=16, data_dir=str(tmp_path / "data"),
                manual_dir=str(manual))
  assert len(list(load("imagenet2012", "validation", is_training=False, **kwargs))) == 1
  with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar"):
    load("imagenet2012", "train", is_training=True, **kwargs)
