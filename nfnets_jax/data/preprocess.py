"""Decoding, cropping, resizing and normalisation of single images.

Follows the published NFNets preprocessing:

* training: an Inception-style random crop (area 8%-100%, aspect 3/4-4/3,
  10 attempts, falling back to the evaluation centre crop when no attempt fits),
  a random left-right flip, then a bicubic resize. JPEGs are decoded only
  inside the crop window (`decode_and_crop_jpeg`), which is most of the speed of
  an ImageNet pipeline; other formats (the PNG digits, folder PNGs) are decoded
  whole, then cropped.
* evaluation, `eval_preproc`:
  - 'crop_resize': a centre crop of aspect image_size, as large as leaves a
    margin of at least 32 px (in image_size units) on the short side, then a
    bicubic resize to image_size;
  - 'resize_crop_{pct}': a bicubic resize of the whole image to
    (image_size + pct) on each side when pct > 1 (pixels), or image_size / pct
    when pct <= 1 (a fraction), then a centre crop of image_size. As published,
    the resize does not keep the aspect ratio: both sides go to that size;
  - 'center_crop_{fraction}': timm's 'center' crop: a bicubic resize of the
    shorter side to int(image_size / fraction), the other side in proportion,
    then a centre crop of image_size.

Bicubic resizing overshoots, so images leave this module as float32 slightly
outside [0, 255] (as in the published pipeline); RandAugment clips them.
"""

from typing import Sequence

from nfnets_jax.data import rng
from nfnets_jax.data._tf import tf
# The settings' parsers live in the TF-free `preproc_spec`; re-exported here.
from nfnets_jax.data.preproc_spec import (DEFAULT_NORMALIZATION, EVAL_PREPROC_FORMS,
                                          MAX_IMAGE_SIDE, MEAN_RGB, NORMALIZATIONS, STDDEV_RGB,
                                          TRAIN_PREPROCS, check_train_preproc, image_size_hw,
                                          normalization_stats, parse_eval_preproc,
                                          resize_crop_scaled_size)

CROP_PADDING = 32


def _shape_hw(image_bytes: tf.Tensor) -> tf.Tensor:
  return tf.image.extract_jpeg_shape(image_bytes)[:2]


def _decode_any(image_bytes: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_and_crop(image_bytes: tf.Tensor, window_fn) -> tf.Tensor:
  """Decodes `image_bytes` (any format) to RGB uint8, cropped to `window_fn(hw)`.

  `window_fn` maps the [2] int32 image shape to an [4] int32 window
  (offset_y, offset_x, height, width); JPEGs are decoded only inside it.
  """
  def jpeg():
    window = window_fn(_shape_hw(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = _decode_any(image_bytes)
    w = tf.unstack(window_fn(tf.shape(image)[:2]))
    return image[w[0]:w[0] + w[2], w[1]:w[1] + w[3]]

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def center_crop_window(hw: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
  """The 'crop_resize' window: aspect of image_size, >= CROP_PADDING margin, centred."""
  h = tf.cast(hw[0], tf.float32)
  w = tf.cast(hw[1], tf.float32)
  scale = tf.minimum(h / (image_size[0] + CROP_PADDING), w / (image_size[1] + CROP_PADDING))
  crop_h = tf.maximum(tf.cast(scale * image_size[0], tf.int32), 1)
  crop_w = tf.maximum(tf.cast(scale * image_size[1], tf.int32), 1)
  crop_h = tf.minimum(crop_h, hw[0])
  crop_w = tf.minimum(crop_w, hw[1])
  offset_y = (hw[0] - crop_h + 1) // 2
  offset_x = (hw[1] - crop_w + 1) // 2
  return tf.stack([offset_y, offset_x, crop_h, crop_w])


def random_crop_window(hw: tf.Tensor, image_size: tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
  """An Inception crop window, or the centre window when sampling gave the whole image."""
  hw = tf.cast(hw, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([hw, [3]], axis=0),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  whole_image = tf.reduce_all(tf.equal(size[:2], hw))
  return tf.cond(whole_image, lambda: center_crop_window(hw, image_size), lambda: window)


def resize(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
  """Bicubic resize to float32 (no clamping, as published)."""
  return tf.image.resize(image, size, method=tf.image.ResizeMethod.BICUBIC)


def aspect_kept_size(hw: tf.Tensor, short_side: int) -> tf.Tensor:
  """[2] int32: `hw` scaled so its shorter side is `short_side`, the longer side
  truncated in proportion (torchvision's `Resize(short_side)`)."""
  h, w = tf.unstack(tf.cast(hw, tf.float64))
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  other = tf.cast(short_side * long / short, tf.int32)
  return tf.where(h <= w, tf.stack([short_side, other]), tf.stack([other, short_side]))


def train_image(image_bytes: tf.Tensor, image_size: tuple[int, int], seed: tf.Tensor,
                train_preproc: str = "inception_crop") -> tf.Tensor:
  """Random crop, random flip, bicubic resize: float32 [H, W, 3] in about [0, 255].

  With `train_preproc='resize'`: the whole image, bicubic-resized, unflipped.
  """
  if check_train_preproc(train_preproc) == "resize":
    image = resize(_decode_any(image_bytes), image_size)
    image.set_shape([image_size[0], image_size[1], 3])
    return image
  crop_seed, flip_seed = rng.split_seed(seed, 2)
  image = decode_and_crop(image_bytes, lambda hw: random_crop_window(hw, image_size, crop_seed))
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = resize(image, image_size)
  image.set_shape([image_size[0], image_size[1], 3])
  return image


def eval_image(image_bytes: tf.Tensor, image_size: tuple[int, int], eval_preproc: str) -> tf.Tensor:
  """Deterministic evaluation preprocessing: float32 [H, W, 3] in about [0, 255]."""
  method, pct = parse_eval_preproc(eval_preproc)
  if method == "crop_resize":
    image = decode_and_crop(image_bytes, lambda hw: center_crop_window(hw, image_size))
    image = resize(image, image_size)
  elif method == "center_crop":
    image = _decode_any(image_bytes)
    image = resize(image, aspect_kept_size(tf.shape(image)[:2], int(min(image_size) / pct)))
    offset_y = (tf.shape(image)[0] - image_size[0] + 1) // 2
    offset_x = (tf.shape(image)[1] - image_size[1] + 1) // 2
    image = image[offset_y:offset_y + image_size[0], offset_x:offset_x + image_size[1]]
  else:
    scaled = resize_crop_scaled_size(image_size, pct)
    image = resize(_decode_any(image_bytes), scaled)
    offset_y = (scaled[0] - image_size[0] + 1) // 2
    offset_x = (scaled[1] - image_size[1] + 1) // 2
    image = image[offset_y:offset_y + image_size[0], offset_x:offset_x + image_size[1]]
  image.set_shape([image_size[0], image_size[1], 3])
  return image


def normalize(image: tf.Tensor, normalization: str = DEFAULT_NORMALIZATION) -> tf.Tensor:
  """Subtracts the mean and divides by the std of `normalization` ('imagenet', the default:
  ImageNet's statistics; see `preproc_spec.NORMALIZATIONS`), per RGB channel, 0..255 scale.

  A [H, W, 3] image is computed as rows [H, W * 3] against the statistics tiled
  to one row: the same arithmetic per value, and TF's CPU kernels broadcast a row
  several times faster than a trailing axis of 3.
  """
  mean, std = (tf.constant(v, tf.float32) for v in normalization_stats(normalization))
  image = tf.cast(image, tf.float32)
  if image.shape.rank != 3 or image.shape[-1] != 3:
    return (image - mean) / std
  shape = tf.shape(image)
  width = shape[1:2]
  rows = tf.reshape(image, [shape[0], shape[1] * 3])
  rows = (rows - tf.tile(mean, width)) / tf.tile(std, width)
  out = tf.reshape(rows, shape)
  out.set_shape(image.shape)
  return out
