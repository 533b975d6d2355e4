"""Per-stage CPU cost of the training input pipeline (`bench_input_pipeline.py --per-op`).

Each stage (decode, crop, resize, each RandAugment op, mixing, normalisation) runs
alone as a sequential tf.data map over inputs prepared in memory from the
benchmark's JPEGs, on one tf.data thread, so its CPU time per element is what the
stage costs inside the pipeline (tf.data's per-element overhead included). The
same count of elements through an identity map is measured too and subtracted.
"""

import time
from typing import Callable

import numpy as np


def _cpu_per_element(ds, count: int, repeats: int) -> float:
  """Least CPU seconds per element of `count` elements of `ds` over `repeats` runs."""
  import tensorflow as tf
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  counted = ds.take(count).with_options(options)
  counted.reduce(np.int64(0), lambda n, _: n + 1)  # Warm-up: traces and builds.
  best = float("inf")
  for _ in range(repeats):
    start = time.process_time()
    counted.reduce(np.int64(0), lambda n, _: n + 1)
    best = min(best, (time.process_time() - start) / count)
  return best


def _stage(inputs, fn: Callable, count: int, repeats: int, baseline: float) -> float:
  import tensorflow as tf
  ds = tf.data.Dataset.from_tensor_slices(inputs).repeat().map(fn)
  return max(_cpu_per_element(ds, count, repeats) - baseline, 0.0) * 1e3


def profile(jpeg_paths: list[str], image_size: int, magnitude: int, count: int,
            repeats: int) -> list[tuple[str, float]]:
  """(stage, CPU ms per element) for the stages of `cutmix_mixup_randaugment_4<magnitude>`."""
  import tensorflow as tf
  from nfnets_jax.data import integrity, mixing, preprocess, randaugment
  from nfnets_jax.data.augment_spec import parse_augment_name

  size = (image_size, image_size)
  encoded = tf.constant([open(p, "rb").read() for p in jpeg_paths])
  seeds = tf.stack([tf.constant([5, i], tf.int64) for i in range(len(jpeg_paths))])
  windows = tf.stack([preprocess.random_crop_window(
      preprocess._shape_hw(encoded[i]), size, seeds[i]) for i in range(len(jpeg_paths))])
  crops = [tf.image.decode_and_crop_jpeg(encoded[i], windows[i], channels=3)
           for i in range(len(jpeg_paths))]
  resized = tf.stack([preprocess.resize(c, size) for c in crops])
  uint8 = tf.cast(tf.clip_by_value(resized, 0.0, 255.0), tf.uint8)
  spec = parse_augment_name(f"cutmix_mixup_randaugment_4{magnitude:02d}")

  baseline = _cpu_per_element(
      tf.data.Dataset.from_tensor_slices((encoded, seeds)).repeat().map(lambda e, s: s),
      count, repeats)
  rows = [("(tf.data per-element overhead, subtracted from every row)", baseline * 1e3)]
  rows.append(("corrupt-file check (byte markers)", _stage(
      encoded, integrity.looks_like_image, count, repeats, baseline)))
  rows.append(("decode whole JPEG", _stage(
      encoded, lambda e: tf.io.decode_jpeg(e, channels=3), count, repeats, baseline)))
  rows.append(("crop window (sample_distorted_bounding_box)", _stage(
      (encoded, seeds), lambda e, s: preprocess.random_crop_window(
          preprocess._shape_hw(e), size, s), count, repeats, baseline)))
  rows.append(("decode only the crop (decode_and_crop_jpeg)", _stage(
      (encoded, windows), lambda e, w: tf.image.decode_and_crop_jpeg(e, w, channels=3),
      count, repeats, baseline)))
  rows.append(("whole train_image (window, decode crop, flip, bicubic resize)", _stage(
      (encoded, seeds), lambda e, s: preprocess.train_image(e, size, s), count,
      repeats, baseline)))
  rows.append(("mixup of a pair (float32)", _stage(
      (resized, tf.roll(resized, 1, 0), seeds), lambda a, b, s: mixing.mix_pair(
          spec, {"images": a, "labels": 0}, {"images": b, "labels": 1}, s, False),
      count, repeats, baseline)))
  rows.append(("CutMix of a pair (float32)", _stage(
      (resized, tf.roll(resized, 1, 0), seeds), lambda a, b, s: mixing.mix_pair(
          spec, {"images": a, "labels": 0}, {"images": b, "labels": 1}, s, True),
      count, repeats, baseline)))
  rows.append(("RandAugment's clip + cast to uint8 and back", _stage(
      resized, lambda x: tf.cast(tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8),
                                tf.float32), count, repeats, baseline)))
  layer = randaugment._layer_function(float(magnitude), image_size, image_size)
  for op_index, name in enumerate(randaugment.OP_NAMES):
    rows.append((f"RandAugment op {name} (one layer)", _stage(
        (uint8, seeds), lambda x, s, i=op_index: layer(x, i, s), count, repeats,
        baseline)))
  rows.append(("normalize (mean/std)", _stage(
      resized, preprocess.normalize, count, repeats, baseline)))
  return rows
