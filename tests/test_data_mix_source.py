"""`mix_source`: the partner of each mixed image is the next example read ('stream',
published) or another image of its batch ('batch'). Both must mix with the same
statistics (ratio distributions, the mixup/CutMix split, label weights) and keep the
pipeline's guarantees (resume, per-process parts, corrupt files counted)."""

import numpy as np
import pytest

from data_helpers import digits_data_dir, encode  # noqa: F401  (fixture)

tf = pytest.importorskip("tensorflow")
stats = pytest.importorskip("scipy.stats")

from nfnets_jax.data import MEAN_RGB, STDDEV_RGB, load  # noqa: E402

NUM_CLASSES = 24
BATCH = 16
SIZE = 8


def _value(label):
  """The grey level of every pixel of class `label`'s one image."""
  return 10.0 * np.asarray(label) + 5.0


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
  """One constant-grey PNG per class (value = _value(class)), so the pixels of a mixed
  image say exactly how much of each label it holds."""
  root = tmp_path_factory.mktemp("flat_classes")
  for k in range(NUM_CLASSES):
    (root / f"class_{k:02d}").mkdir()
    image = np.full((SIZE, SIZE, 3), _value(k), np.uint8)
    (root / f"class_{k:02d}" / "img.png").write_bytes(encode(image, "PNG"))
  return root


def _load(root, mix_source, tmp_path_factory, **kwargs):
  args = dict(is_training=True, batch_dims=(BATCH,), image_size=SIZE, augment_name="mixup_cutmix",
              train_preproc="resize", mix_source=mix_source, seed=7, autotune=False,
              data_dir=str(tmp_path_factory.getbasetemp() / "tfds_flat"))
  args.update(kwargs)
  return load(f"folder:{root}", "train", **args)


def _outputs(root, mix_source, tmp_path_factory, steps=64):
  batches = _load(root, mix_source, tmp_path_factory)
  out = [next(batches) for _ in range(steps)]
  return {k: np.stack([b[k] for b in out]) for k in out[0]}  # [steps, BATCH, ...]


@pytest.fixture(scope="module")
def mixed(flat_folder, tmp_path_factory):
  return {source: _outputs(flat_folder, source, tmp_path_factory)
          for source in ("stream", "batch")}


@pytest.mark.parametrize("source", ["stream", "batch"])
def test_pixels_hold_each_label_in_proportion_to_ratio(mixed, source):
  out = mixed[source]
  grey = out["images"][..., 0] * STDDEV_RGB[0] + MEAN_RGB[0]  # Undo normalisation.
  ratio = out["ratio"][..., None, None]
  want = ratio * _value(out["labels"])[..., None, None] + (1 - ratio) * _value(
      out["mix_labels"])[..., None, None]
  np.testing.assert_allclose(grey.mean(axis=(2, 3)), want[..., 0, 0], atol=2e-3)
  half = BATCH // 2
  cut = out["ratio"][:, half:] * SIZE * SIZE  # CutMix half: whole pixels of each image.
  np.testing.assert_allclose(cut, np.round(cut), atol=1e-3)
  both = (out["labels"] != out["mix_labels"])[:, :half]
  # Mixup half: every pixel of an image is the same blend.
  spread = grey[:, :half].max(axis=(2, 3)) - grey[:, :half].min(axis=(2, 3))
  assert np.all(spread[both] < 1e-3)


@pytest.mark.parametrize("source", ["stream", "batch"])
def test_ratio_distributions_are_the_published_ones(mixed, source):
  half = BATCH // 2
  mixup = mixed[source]["ratio"][:, :half].ravel()
  assert stats.kstest(mixup, stats.beta(0.2, 0.2).cdf).pvalue > 1e-3
  assert abs(mixup.mean() - 0.5) < 0.05
  cutmix = mixed[source]["ratio"][:, half:].ravel()
  # Under half the pixels on average: the box (area fraction uniform) is clipped at the
  # border, and its sides are truncated to whole pixels.
  assert 0.15 < cutmix.mean() < 0.35 and cutmix.min() < 0.05 and cutmix.max() > 0.7


def test_both_sources_mix_with_the_same_statistics(mixed):
  half = BATCH // 2
  stream, batch = mixed["stream"], mixed["batch"]
  for part in (slice(0, half), slice(half, BATCH)):  # mixup half, CutMix half
    a, b = stream["ratio"][:, part].ravel(), batch["ratio"][:, part].ravel()
    assert stats.ks_2samp(a, b).pvalue > 1e-3
  for out in (stream, batch):  # Partners are other images, a random class each.
    same = np.mean(out["labels"] == out["mix_labels"])
    assert same < 3 / NUM_CLASSES
    assert len(np.unique(out["mix_labels"])) == NUM_CLASSES


def test_batch_source_partners_are_the_batch_shifted_by_half(mixed):
  out = mixed["batch"]
  np.testing.assert_array_equal(out["mix_labels"], np.roll(out["labels"], -BATCH // 2, axis=1))
  # And 'stream' reads its partners: they are not the batch's own images.
  stream = mixed["stream"]
  assert np.mean(stream["mix_labels"] == np.roll(stream["labels"], -BATCH // 2, axis=1)) < 0.2


@pytest.mark.slow
def test_batch_source_resumes_exactly(digits_data_dir):
  kwargs = dict(is_training=True, batch_dims=(2, 4), image_size=16, data_dir=digits_data_dir,
                augment_name="cutmix_mixup_randaugment_405", augment_before_mix=False,
                mix_source="batch", seed=5, shuffle_buffer=100)
  full = load("digits", "train", **kwargs)
  batches = [next(full) for _ in range(5)]
  resumed = load("digits", "train", start_step=3, **kwargs)
  for want in batches[3:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert resumed.step == 5
  other = load("digits", "train", **{**kwargs, "mix_source": "stream"})
  assert not np.array_equal(next(other)["images"], batches[0]["images"])


def test_batch_source_reads_only_its_process_part_and_counts_corrupt_files(
    flat_folder, tmp_path_factory, tmp_path):
  # A copy of the folder with a corrupt file in it.
  root = tmp_path / "flat"
  for k in range(NUM_CLASSES):
    (root / f"class_{k:02d}").mkdir(parents=True)
    (root / f"class_{k:02d}" / "img.png").write_bytes(
        (flat_folder / f"class_{k:02d}" / "img.png").read_bytes())
  garbage = root / "class_03" / "garbage.png"
  garbage.write_bytes(b"not an image")
  seen, skipped = [], []
  for index in range(2):
    batches = _load(root, "batch", tmp_path_factory, process_index=index, process_count=2,
                    batch_dims=(4,), data_dir=str(tmp_path / "tfds"))
    labels = set()
    for _ in range(12):
      batch = next(batches)
      labels |= set(batch["labels"].tolist()) | set(batch["mix_labels"].tolist())
    seen.append(labels)
    skipped += batches.skipped_files
  assert not seen[0] & seen[1]  # Each process mixes only images of its own part.
  assert len(seen[0] | seen[1]) == NUM_CLASSES
  # Dropped and named (through the folder's view) by the process whose part holds it.
  assert len(skipped) == 1 and skipped[0].endswith("class_03/garbage.png")


def test_an_unknown_mix_source_is_a_config_error_naming_the_field():
  from nfnets_jax.train import config as config_lib
  config = config_lib.base_config()
  config.dataset.mix_source = "pairs"
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.dataset.mix_source: Unknown mix_source 'pairs'; valid: "
                           r"'stream', 'batch'"):
    config_lib.validate(config)
  config.dataset.mix_source = "batch"
  config_lib.validate(config)
