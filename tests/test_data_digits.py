"""The embedded `digits` dataset: a real TFDS dataset built from scikit-learn's digits."""

import collections
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_helpers import digits_data_dir  # noqa: F401  (fixture)

tfds = pytest.importorskip("tensorflow_datasets")

from nfnets_jax.data import digits, load  # noqa: E402


def _read_split(data_dir, split):
  builder = tfds.builder("digits", data_dir=data_dir)
  rows = list(tfds.as_numpy(builder.as_dataset(split=split)))
  return builder, rows


def test_prepared_in_data_dir_with_sizes_of_stratified_80_20_split(digits_data_dir):
  builder = tfds.builder("digits", data_dir=digits_data_dir)
  assert builder.is_prepared()
  assert str(builder.data_dir).startswith(digits_data_dir)
  _, labels = digits.load_arrays()
  per_class = collections.Counter(labels.tolist())
  expected_test = sum(n // digits.TEST_EVERY for n in per_class.values())
  assert builder.info.splits["test"].num_examples == expected_test
  assert builder.info.splits["train"].num_examples == len(labels) - expected_test
  assert builder.info.features["label"].num_classes == 10


def test_split_is_stratified_disjoint_complete_and_fixed(digits_data_dir):
  images, labels = digits.load_arrays()
  _, train = _read_split(digits_data_dir, "train")
  _, test = _read_split(digits_data_dir, "test")
  train_idx = {int(r["index"]) for r in train}
  test_idx = {int(r["index"]) for r in test}
  assert not train_idx & test_idx
  assert train_idx | test_idx == set(range(len(labels)))
  assert test_idx == set(digits.split_indices(labels)["test"].tolist())
  for c in range(10):
    n_class = int(np.sum(labels == c))
    n_test = sum(1 for i in test_idx if labels[i] == c)
    assert n_test == n_class // 5, (c, n_test, n_class)  # 20% of every class.


def test_images_decode_to_the_scikit_learn_pixels_and_labels_0_to_9(digits_data_dir):
  images, labels = digits.load_arrays()
  _, test = _read_split(digits_data_dir, "test")
  seen = set()
  for row in test:
    i = int(row["index"])
    assert row["image"].shape == (8, 8, 1) and row["image"].dtype == np.uint8
    np.testing.assert_array_equal(row["image"], images[i])
    assert int(row["label"]) == labels[i]
    seen.add(int(row["label"]))
  assert seen == set(range(10))
  assert images.max() == 255 and images.min() == 0


def test_images_are_stored_png_encoded(digits_data_dir):
  builder = tfds.builder("digits", data_dir=digits_data_dir)
  ds = builder.as_dataset(split="train[:3]", decoders={"image": tfds.decode.SkipDecoding()})
  for row in tfds.as_numpy(ds):
    assert row["image"].startswith(b"\x89PNG")


def test_load_prepares_digits_on_first_use(tmp_path):
  data_dir = str(tmp_path / "fresh")
  batches = load("digits", "test", is_training=False, batch_dims=(16,), image_size=16,
                 data_dir=data_dir)
  assert tfds.builder("digits", data_dir=data_dir).is_prepared()
  total = 0
  for batch in batches:
    assert batch["images"].shape == (16, 16, 16, 3)
    assert set(np.unique(batch["labels"][batch["mask"] == 1])) <= set(range(10))
    total += int(batch["mask"].sum())
  assert total == batches.num_examples == tfds.builder(
      "digits", data_dir=data_dir).info.splits["test"].num_examples
  assert batches.num_classes == 10


# Each process imports TensorFlow, says it is ready, then opens the source as
# soon as the parent says go: the preparations overlap, as when the processes
# of a multi-process job start on a fresh data_dir.
_OPEN_AT_ONCE = """
import json, os, sys, time
from nfnets_jax.data.sources import open_source
data_dir, ready, go = sys.argv[1:4]
open(ready, "w").close()
while not os.path.exists(go):
  time.sleep(0.01)
source = open_source("digits", "train", data_dir=data_dir)
print(json.dumps({"train": source.num_examples("train"), "test": source.num_examples("test")}))
"""


@pytest.mark.slow
def test_processes_preparing_one_data_dir_at_once_all_succeed(tmp_path):
  """Without the preparation lock (sources.py) all but one fail to rename their copy."""
  data_dir, count = str(tmp_path / "tfds"), 2
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, data_dir,
                             str(tmp_path / f"ready{i}"), str(tmp_path / "go")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(count)]
  deadline = time.time() + 120
  while (not all((tmp_path / f"ready{i}").exists() for i in range(count))
         and time.time() < deadline and all(p.poll() is None for p in procs)):
    time.sleep(0.05)
  (tmp_path / "go").touch()
  outputs = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  sizes = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  _, labels = digits.load_arrays()
  assert sizes == [sizes[0]] * count and sum(sizes[0].values()) == len(labels)
