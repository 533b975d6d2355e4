"""`load` end to end on the embedded digits and on image folders: shapes, preprocessing
semantics, determinism, resume, layouts, and refusal of bad input."""

import logging
import os

import numpy as np
import pytest

from data_helpers import digits_data_dir, encode, random_image, write_folder  # noqa: F401

tf = pytest.importorskip("tensorflow")

from nfnets_jax.data import MEAN_RGB, STDDEV_RGB, load, preprocess  # noqa: E402
from nfnets_jax.data.augment_spec import parse_augment_name  # noqa: E402

LOW = (0 - np.array(MEAN_RGB)) / np.array(STDDEV_RGB)
HIGH = (255 - np.array(MEAN_RGB)) / np.array(STDDEV_RGB)


def _train(data_dir, augment_name=None, **kwargs):
  args = dict(is_training=True, batch_dims=(2, 4), image_size=16, augment_name=augment_name,
              data_dir=data_dir, seed=0, shuffle_buffer=100)
  args.update(kwargs)
  return load("digits", "train", **args)


def _take(batches, n):
  return [next(batches) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- preprocessing semantics -------------------------------------------------------------

def test_crop_resize_window_keeps_a_32px_margin_in_output_units():
  for hw in [(100, 200), (300, 120), (64, 64)]:
    window = preprocess.center_crop_window(tf.constant(hw), (32, 32)).numpy()
    y, x, h, w = window
    scale = min(hw[0], hw[1]) / (32 + 32)
    assert h == w == int(scale * 32)
    assert abs((hw[0] - h) - 2 * y) <= 1 and abs((hw[1] - w) - 2 * x) <= 1  # centred


def test_resize_crop_squashes_both_sides_then_centre_crops_as_published():
  # 64 x 256 horizontal ramp (value = column). resize_crop_32 at 32 px resizes to 64 x 64
  # (aspect not kept), then crops columns 16..48 of 64, i.e. source columns ~64..192.
  ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3))
  out = preprocess.eval_image(tf.constant(encode(ramp, "PNG")), (32, 32), "resize_crop_32")
  out = out.numpy()[..., 0]
  assert out.shape == (32, 32)
  assert 56 < out[:, 0].mean() < 72 and 184 < out[:, -1].mean() < 200
  # A fraction: resize_crop_0.5 -> resize to 64 x 64 as well.
  np.testing.assert_allclose(
      preprocess.eval_image(tf.constant(encode(ramp, "PNG")), (32, 32), "resize_crop_0.5"
                            ).numpy()[..., 0], out, atol=1e-3)


def test_center_crop_keeps_the_aspect_ratio_as_timm_does():
  # 64 x 256 ramp, center_crop_0.5 at 32 px: shorter side to 64 (64 x 256, unchanged), then
  # the central 32 x 32: source columns 112..144.
  ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3))
  out = preprocess.eval_image(tf.constant(encode(ramp, "PNG")), (32, 32), "center_crop_0.5")
  out = out.numpy()[..., 0]
  assert out.shape == (32, 32)
  np.testing.assert_allclose(out[0], np.arange(112, 144), atol=1e-3)
  assert preprocess.aspect_kept_size(tf.constant([300, 200]), 100).numpy().tolist() == [150, 100]
  with pytest.raises(ValueError, match="center_crop_<fraction>"):
    preprocess.parse_eval_preproc("center_crop_1.5")


def test_random_crop_windows_follow_inception_ranges():
  hw = (120, 160)
  windows = np.stack([preprocess.random_crop_window(tf.constant(hw), (32, 32),
                                                    tf.constant([3, i], tf.int64)).numpy()
                      for i in range(100)])
  y, x, h, w = windows.T
  assert np.all((y >= 0) & (x >= 0) & (y + h <= hw[0]) & (x + w <= hw[1]))
  area = h * w / (hw[0] * hw[1])
  assert np.all((area >= 0.07) & (area <= 1.0))
  aspect = w / h
  assert np.all((aspect > 0.7) & (aspect < 1.4))
  assert len({tuple(wi) for wi in windows}) > 90


def test_random_crop_falls_back_to_centre_crop_when_nothing_fits():
  hw = tf.constant([2, 1000])  # No crop of area >= 8% has an aspect ratio in [3/4, 4/3].
  got = preprocess.random_crop_window(hw, (32, 32), tf.constant([1, 2], tf.int64)).numpy()
  np.testing.assert_array_equal(got, preprocess.center_crop_window(hw, (32, 32)).numpy())


def test_jpeg_and_png_take_the_same_train_path():
  y, x = np.mgrid[0:50, 0:60]
  img = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)  # smooth: JPEG-friendly
  seed = tf.constant([1, 1], tf.int64)
  png = preprocess.train_image(tf.constant(encode(img, "PNG")), (24, 24), seed).numpy()
  jpg = preprocess.train_image(tf.constant(encode(img, "JPEG")), (24, 24), seed).numpy()
  assert png.shape == jpg.shape == (24, 24, 3)
  assert np.abs(png - jpg).mean() < 4  # Same crop; only JPEG loss differs.


def test_normalize_uses_imagenet_statistics():
  mean = tf.constant(np.array(MEAN_RGB, np.float32)[None, None])
  np.testing.assert_allclose(preprocess.normalize(mean).numpy(), 0, atol=1e-5)
  np.testing.assert_allclose(MEAN_RGB, np.array([0.485, 0.456, 0.406]) * 255)
  np.testing.assert_allclose(STDDEV_RGB, np.array([0.229, 0.224, 0.225]) * 255)


@pytest.mark.parametrize("augment_name, kwargs", [
    (None, {"is_training": False}),
    ("randaugment_405", {}),
    ("mixup_randaugment_405", {"augment_before_mix": False}),  # normalised after the mix
])
def test_normalization_is_the_one_asked_for_on_every_path(digits_data_dir, augment_name, kwargs):
  """The same pixels, normalised with ImageNet's statistics or with 0.5/0.5 ('inception',
  as some of timm's weights want): undoing each normalisation gives the same image."""
  batches = {norm: next(_train(digits_data_dir, augment_name, normalization=norm, **kwargs))
             for norm in ("imagenet", "inception")}
  pixels_imagenet = batches["imagenet"]["images"] * STDDEV_RGB + np.asarray(MEAN_RGB)
  pixels_inception = batches["inception"]["images"] * 127.5 + 127.5
  np.testing.assert_allclose(pixels_inception, pixels_imagenet, atol=1e-3)
  assert not np.allclose(batches["inception"]["images"], batches["imagenet"]["images"], atol=0.1)


# --- batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("augment_name", [None, "randaugment_405", "mixup", "cutmix",
                                          "cutmix_mixup_randaugment_405"])
def test_training_batch_contract(digits_data_dir, augment_name):
  batch = next(_train(digits_data_dir, augment_name))
  assert batch["images"].shape == (2, 4, 16, 16, 3) and batch["images"].dtype == np.float32
  assert batch["labels"].shape == (2, 4) and batch["labels"].dtype == np.int32
  assert np.all((batch["labels"] >= 0) & (batch["labels"] < 10))
  assert np.all(np.isfinite(batch["images"]))
  if augment_name and "randaugment" in augment_name:  # Clipped to [0, 255] before normalising.
    assert np.all(batch["images"] >= LOW.min() - 1e-4) and np.all(batch["images"] <= HIGH.max() + 1e-4)
  mixes = augment_name in ("mixup", "cutmix", "cutmix_mixup_randaugment_405")
  assert ("mix_labels" in batch) == ("ratio" in batch) == mixes
  assert "mask" not in batch
  if mixes:
    assert batch["mix_labels"].dtype == np.int32 and batch["ratio"].dtype == np.float32
    assert np.all((batch["ratio"] >= 0) & (batch["ratio"] <= 1))
    assert np.all((batch["mix_labels"] >= 0) & (batch["mix_labels"] < 10))


def test_mixup_cutmix_halves(digits_data_dir):
  batch = next(_train(digits_data_dir, "mixup_cutmix", batch_dims=(64,)))
  cut = batch["ratio"][32:] * 16 * 16  # CutMix ratios are whole pixel counts.
  np.testing.assert_allclose(cut, np.round(cut), atol=1e-3)
  assert not np.allclose(batch["ratio"][:32] * 256, np.round(batch["ratio"][:32] * 256), atol=1e-3)


def _mix_then_augment(data_dir, augment_name, *, seed, image_size, batch_size):
  """The published NFNet order, built from the library's pieces rather than the pipeline:
  mix consecutive examples of the stream in pairs, then RandAugment each mixed image
  once, with the seeds the pipeline gives each example (`rng`).

  The stream is the files' seeded order (as the pipeline reads them, with a shuffle
  buffer of 1) and 'resize' preprocessing (no random crop), so the examples need no
  pipeline to find. Returns the first batch, as the pipeline's.
  """
  from nfnets_jax.data import mixing, randaugment, rng  # pylint: disable=import-outside-toplevel
  from nfnets_jax.data.sources import open_source  # pylint: disable=import-outside-toplevel
  spec = parse_augment_name(augment_name)
  size = (image_size, image_size)
  records, _ = open_source("digits", "train", data_dir=data_dir).read(
      "train", process_index=0, process_count=1, shuffle_files=True, seed=seed)
  key = rng.run_seed(seed, 0)
  examples = []
  for index, record in enumerate(records.take(2 * batch_size)):
    crop_seed, augment_seed, mix_seed = rng.split_seed(rng.example_seed(key, index), 3)
    examples.append({"images": preprocess.train_image(record["image"], size, crop_seed, "resize"),
                     "labels": record["label"], "augment_seed": augment_seed,
                     "mix_seed": mix_seed})
  outputs = []
  for pair_index in range(batch_size):
    a, b = examples[2 * pair_index], examples[2 * pair_index + 1]
    mixed = mixing.mix_pair(spec, a, b, a["mix_seed"],
                            mixing.uses_cutmix(spec, pair_index, batch_size))
    augmented = randaugment.randaugment_float(mixed["images"], spec.randaugment_layers,
                                              spec.randaugment_magnitude, a["augment_seed"])
    outputs.append({**mixed, "images": preprocess.normalize(augmented)})
  return {name: np.stack([out[name].numpy() for out in outputs])
          for name in ("images", "labels", "mix_labels", "ratio")}


def test_augment_after_mix_is_mixing_then_one_randaugment_per_mixed_image(digits_data_dir):
  """augment_before_mix=False (the published NFNet experiment): each output image is the
  mix of a pair, RandAugment-ed once; the mixing (pairs, ratios, labels) is that of the
  other order, and only the images differ from it."""
  name, seed = "cutmix_mixup_randaugment_405", 3
  kwargs = dict(batch_dims=(8,), seed=seed, shuffle_buffer=1, train_preproc="resize")
  after = next(_train(digits_data_dir, name, augment_before_mix=False, **kwargs))
  before = next(_train(digits_data_dir, name, augment_before_mix=True, **kwargs))
  want = _mix_then_augment(digits_data_dir, name, seed=seed, image_size=16, batch_size=8)
  for key in ("labels", "mix_labels", "ratio"):
    np.testing.assert_array_equal(after[key], want[key], err_msg=key)
    np.testing.assert_array_equal(before[key], want[key], err_msg=key)
  np.testing.assert_allclose(after["images"], want["images"], atol=1e-5)
  assert not np.allclose(before["images"], want["images"], atol=0.1)
  assert after["images"].min() >= LOW.min() - 1e-4 and after["images"].max() <= HIGH.max() + 1e-4


def test_eval_is_deterministic_padded_and_masked(digits_data_dir):
  def run():
    return list(load("digits", "test", is_training=False, batch_dims=(3, 8), image_size=16,
                     data_dir=digits_data_dir))
  first, second = run(), run()
  _assert_same(first, second)
  masks = np.concatenate([b["mask"].ravel() for b in first])
  n = int(masks.sum())
  assert np.all(masks[:n] == 1) and np.all(masks[n:] == 0)  # Padding only at the end.
  assert len(masks) == len(first) * 24 and len(masks) - n < 24
  padded = np.concatenate([b["images"].reshape(24, -1) for b in first])[n:]
  assert np.all(padded == 0)


def test_seeded_training_is_reproducible_and_seed_dependent(digits_data_dir):
  # (With augmentation, reproducibility is also covered by the resume tests below.)
  a = _take(_train(digits_data_dir, seed=11), 2)
  _assert_same(a, _take(_train(digits_data_dir, seed=11), 2))
  c = _take(_train(digits_data_dir, seed=12), 2)
  assert not np.array_equal(a[0]["images"], c[0]["images"])


def test_autotune_off_gives_the_same_batches(digits_data_dir):
  """`autotune=False` only changes how tf.data schedules work, not what it yields."""
  tuned, fixed = _train(digits_data_dir, "mixup"), _train(digits_data_dir, "mixup", autotune=False)
  assert tuned.dataset.options().autotune.enabled is True
  assert fixed.dataset.options().autotune.enabled is False
  _assert_same(_take(tuned, 3), _take(fixed, 3))


@pytest.mark.parametrize("augment_before_mix", [True, False])
def test_resume_at_a_step_continues_exactly(digits_data_dir, augment_before_mix):
  name = "cutmix_mixup_randaugment_405"
  full = _train(digits_data_dir, name, seed=5, augment_before_mix=augment_before_mix)
  batches = _take(full, 5)
  assert full.step == 5 and full.state() == {"step": 5}
  resumed = _train(digits_data_dir, name, seed=5, augment_before_mix=augment_before_mix,
                   start_step=3)
  _assert_same(batches[3:], _take(resumed, 2))
  assert resumed.step == 5


def test_fast_mode_runs_unseeded_and_resumes_without_replaying(digits_data_dir):
  batches = _train(digits_data_dir, "cutmix_mixup_randaugment_405", seed=None, num_threads=2,
                   shuffle_buffer=None, start_step=10**9)  # Replaying would never finish.
  assert batches.step == 10**9
  for batch in _take(batches, 3):
    assert batch["images"].shape == (2, 4, 16, 16, 3)
  assert batches.step == 10**9 + 3


def test_transpose_and_bfloat16(digits_data_dir):
  import jax.numpy as jnp
  plain = next(_train(digits_data_dir))
  moved = next(_train(digits_data_dir, transpose=True, dtype=jnp.bfloat16))
  assert moved["images"].shape == (2, 16, 16, 3, 4)  # per device HWCN
  assert moved["images"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.moveaxis(moved["images"].astype(np.float32), -1, 1),
                             plain["images"], atol=0.05)


def test_fake_data_shapes_without_a_dataset(tmp_path):
  train = load("no_such_dataset", "train", is_training=True, batch_dims=(2, 3), image_size=8,
               augment_name="mixup", fake_data=True, transpose=True, data_dir=str(tmp_path))
  batch = next(train)
  assert batch["images"].shape == (2, 8, 8, 3, 3)
  assert batch["mix_labels"].shape == batch["ratio"].shape == (2, 3)
  evals = list(load("x", "test", is_training=False, batch_dims=(4,), image_size=8,
                    fake_data=True))
  assert len(evals) == 1 and evals[0]["mask"].sum() == 4
  assert not os.listdir(tmp_path)


# --- folders and corrupt files -----------------------------------------------------------

def test_flat_class_folder_is_the_train_split(tmp_path):
  write_folder(tmp_path / "pets", {"cat": 3, "dog": 2})
  batches = load(f"folder:{tmp_path / 'pets'}", "train", is_training=False, batch_dims=(4,),
                 image_size=12, data_dir=str(tmp_path / "tfds"))
  out = list(batches)
  labels = np.concatenate([b["labels"][b["mask"] == 1] for b in out])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1] and batches.num_classes == 2
  with pytest.raises(ValueError, match="'validation'.*\\['train'\\]"):
    load(f"folder:{tmp_path / 'pets'}", "validation", is_training=False, batch_dims=(4,),
         image_size=12, data_dir=str(tmp_path / "tfds"))


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, caplog):
  root = tmp_path / "images"
  write_folder(root / "train", {"a": 4, "b": 3})
  write_folder(root / "test", {"a": 1, "b": 1})
  garbage = root / "train" / "a" / "garbage.jpg"
  garbage.write_bytes(b"this is not an image")
  truncated = root / "train" / "b" / "truncated.jpg"
  truncated.write_bytes(encode(random_image(9, 40, 40))[:300])
  caplog.set_level(logging.WARNING)
  batches = load(f"folder:{root}", "train", is_training=False, batch_dims=(4,), image_size=12)
  out = list(batches)
  assert sum(int(b["mask"].sum()) for b in out) == 7  # 9 files, 2 skipped, padding masked
  assert sorted(batches.skipped_files) == sorted([str(garbage), str(truncated)])
  for path in (garbage, truncated):
    assert any(str(path) in r.getMessage() for r in caplog.records)
  training = load(f"folder:{root}", "train", is_training=True, batch_dims=(4,), image_size=12,
                  augment_name="randaugment_405", seed=0)
  for batch in _take(training, 6):  # Several epochs: keeps going.
    assert batch["images"].shape == (4, 12, 12, 3)
  assert sorted(training.skipped_files) == sorted([str(garbage), str(truncated)])


def test_files_under_8_bytes_are_named_and_counted_not_a_crash(tmp_path, caplog):
  """Issue 38, defect 3: `looks_like_image` raised on files shorter than the WebP check's
  8-byte offset, so such files were dropped by tf.data unnamed and uncounted."""
  from nfnets_jax.data.integrity import looks_like_image  # pylint: disable=import-outside-toplevel
  for data in (b"", b"\xff", b"\xff\xd8\xff", b"RIFF", b"1234567"):
    assert not bool(looks_like_image(tf.constant(data))), data
  root = tmp_path / "images"
  write_folder(root, {"a": 3, "b": 2})
  empty, tiny = root / "a" / "empty.jpg", root / "b" / "tiny.png"
  empty.write_bytes(b"")
  tiny.write_bytes(b"\x89PN")
  caplog.set_level(logging.WARNING)
  batches = load(f"folder:{root}", "train", is_training=False, batch_dims=(4,), image_size=12)
  assert sum(int(b["mask"].sum()) for b in batches) == 5
  assert sorted(batches.skipped_files) == sorted([str(empty), str(tiny)])
  training = load(f"folder:{root}", "train", is_training=True, batch_dims=(4,), image_size=12,
                  seed=0)
  _take(training, 4)  # a few epochs: each file is named once, not once per epoch
  assert sorted(training.skipped_files) == sorted([str(empty), str(tiny)])
  assert sum(str(tiny) in r.getMessage() for r in caplog.records) == 2  # one per pipeline


def test_files_the_decoder_refuses_are_named_and_counted(tmp_path):
  """A JPEG whose start and end markers are intact but whose body is not a JPEG passes the
  byte checks; its decoder's error drops it, and the file is named as the others are."""
  root = tmp_path / "images"
  write_folder(root, {"a": 2, "b": 2})
  garbled = root / "a" / "garbled.jpg"
  garbled.write_bytes(b"\xff\xd8" + b"not a jpeg body" * 10 + b"\xff\xd9")
  dangling = root / "b" / "moved.jpg"
  dangling.symlink_to(tmp_path / "gone.jpg")  # listed, but reading it fails
  batches = load(f"folder:{root}", "train", is_training=False, batch_dims=(2,), image_size=12)
  assert sum(int(b["mask"].sum()) for b in batches) == 4
  assert sorted(batches.skipped_files) == sorted([str(garbled), str(dangling)])


def _next_within(batches, seconds: float):
  """next(batches) in a thread: its result or exception, or a failure if it did not end."""
  import threading  # pylint: disable=import-outside-toplevel
  outcome = {}

  def run():
    try:
      outcome["batch"] = next(batches)
    except Exception as err:  # pylint: disable=broad-except
      outcome["error"] = err

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert outcome, f"next() did not end within {seconds} s"
  return outcome


def test_a_training_split_with_no_readable_image_ends_in_one_error_naming_them(tmp_path):
  """Issue 38, defect 2: an endless stream of files that are all skipped waited forever for
  its first example. Once every file of the split was tried, one error says how many
  and which (short, garbage and undecodable files alike)."""
  root = tmp_path / "broken"
  for label in ("a", "b"):
    (root / label).mkdir(parents=True)
  names = [root / "a" / "short.jpg", root / "a" / "garbage.png", root / "b" / "garbled.jpg"]
  names[0].write_bytes(b"\xff\xd8")
  names[1].write_bytes(b"plain text, not a PNG")
  names[2].write_bytes(b"\xff\xd8" + b"x" * 200 + b"\xff\xd9")
  from nfnets_jax.data.integrity import UnreadableSplitError  # pylint: disable=import-outside-toplevel
  for mix in (None, "mixup"):
    training = load(f"folder:{root}", "train", is_training=True, batch_dims=(2,),
                    image_size=12, seed=0, augment_name=mix)
    error = _next_within(training, 120).get("error")
    assert isinstance(error, UnreadableSplitError), error
    message = str(error)
    assert message.startswith(f"None of the 3 files of folder:{root} split 'train' could be "
                              "read as an image: ")
    assert all(str(name) in message for name in names) and "\n" not in message
    assert sorted(training.skipped_files) == sorted(map(str, names))
  # An evaluation ends by itself: only padding, every file named (its caller refuses to
  # report an accuracy over no example, tests/test_bad_input.py).
  evaluation = load(f"folder:{root}", "train", is_training=False, batch_dims=(2,),
                    image_size=12)
  assert sum(int(b["mask"].sum()) for b in evaluation) == 0
  assert sorted(evaluation.skipped_files) == sorted(map(str, names))


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(augment_name="mixup_autoaugment"), "autoaugment.*valid|valid.*autoaugment|Unknown augm"),
    (dict(image_size=0), "image_size.*0"),
    (dict(image_size=(32,)), "image_size"),
    (dict(image_size=16.5), "image_size"),
    (dict(batch_dims=()), "batch_dims"),
    (dict(batch_dims=(2, 0)), "batch_dims"),
    (dict(batch_dims=(3,), augment_name="mixup_cutmix"), "even"),
    (dict(eval_preproc="resize_crop_x"), "resize_crop_x.*crop_resize"),
    (dict(eval_preproc="center"), "center"),
    (dict(dtype=np.int32), "dtype"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(start_step=-1), "start_step"),
    (dict(num_threads=0), "num_threads"),
    (dict(seed="0"), "seed"),
    (dict(deterministic=True, seed=None), "needs a seed"),
])
def test_bad_arguments_raise_at_call_time(kwargs, match):
  args = dict(is_training=True, batch_dims=(2,), image_size=16, fake_data=True)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    load("digits", "train", **args)


def test_unknown_dataset_and_split(digits_data_dir, tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'not_a_dataset'.*digits"):
    load("not_a_dataset", "train", is_training=True, batch_dims=(2,), image_size=16,
         data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown split 'valid'.*test.*train|train.*test"):
    load("digits", "valid", is_training=False, batch_dims=(2,), image_size=16,
         data_dir=digits_data_dir)
  with pytest.raises(FileNotFoundError, match="'mnist' is not prepared.*download=False"):
    load("mnist", "train", is_training=True, batch_dims=(2,), image_size=16,
         data_dir=str(tmp_path), download=False)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load(f"folder:{tmp_path / 'nowhere'}", "train", is_training=False, batch_dims=(2,),
         image_size=16)


def test_tensorflow_sees_no_accelerators():
  # nfnets_jax.data hides GPUs from TF so that JAX keeps them (tests/test_import_light.py
  # checks that the core packages do not import TF at all).
  assert not tf.config.get_visible_devices("GPU")


def test_resize_train_preproc_keeps_whole_unflipped_image(digits_data_dir):
  """'resize' training preprocessing equals the eval plain resize (resize_crop_1) exactly."""
  from nfnets_jax.data import load
  kwargs = dict(batch_dims=(8,), image_size=16, data_dir=digits_data_dir)
  train = next(load("digits", "test", is_training=True, train_preproc="resize", seed=0,
                    shuffle_buffer=1, **kwargs))
  evals = next(load("digits", "test", is_training=False, eval_preproc="resize_crop_1", **kwargs))
  np.testing.assert_array_equal(train["images"], evals["images"])
  np.testing.assert_array_equal(train["labels"], evals["labels"])


def test_unknown_train_preproc_is_a_clear_error(digits_data_dir):
  from nfnets_jax.data import load
  with pytest.raises(ValueError, match=r"'crop'.*inception_crop, resize"):
    load("digits", "train", is_training=True, batch_dims=(2,), image_size=8,
         train_preproc="crop", data_dir=digits_data_dir)
