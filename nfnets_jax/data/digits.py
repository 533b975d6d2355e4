"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a real TFDS dataset.

The demo and the tests need an image classification dataset that exists
without any download. scikit-learn ships the UCI optical digits (1797 images,
8x8, 17 grey levels) inside its wheel; this builder writes them with TFDS as
PNG-encoded images, so they go through exactly the code path ImageNet does
(TFRecord shards, `SkipDecoding`, decode-and-crop, augmentation).

Images stay 8x8 single-channel (the pipeline decodes them to RGB and resizes).
Grey levels 0..16 are scaled to 0..255 (ink is bright). The split is fixed and
needs no random generator: within each class, in the order scikit-learn
returns them, every fifth example (positions 4, 9, 14, ...) is `test` and the
rest are `train` - a stratified 80/20 split.
"""

import numpy as np
import tensorflow_datasets as tfds

from nfnets_jax.data._tf import tf  # noqa: F401  (hides accelerators before TFDS uses TF)

NUM_CLASSES = 10
TEST_EVERY = 5


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Indices into scikit-learn's arrays of the fixed stratified train/test split."""
  position_in_class = np.zeros(len(labels), dtype=np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    position_in_class[members] = np.arange(len(members))
  is_test = position_in_class % TEST_EVERY == TEST_EVERY - 1
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All digits as uint8 [N, 8, 8, 1] images and int64 labels, straight from scikit-learn."""
  from sklearn.datasets import load_digits  # Lazy: only preparation needs scikit-learn.
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """8x8 handwritten digits bundled with scikit-learn, fixed 80/20 stratified split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: PNG 8x8x1, stratified 80/20 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tf.int64,  # Row in scikit-learn's arrays, for traceability.
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the data is inside scikit-learn.
    images, labels = load_arrays()
    return {name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}
