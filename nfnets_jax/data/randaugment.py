"""RandAugment (Cubuk et al. 2019) in core TensorFlow ops.

The published NFNets code used TensorFlow's AutoAugment module, which needs
`tensorflow_addons` (no longer installable) for rotate/shear/translate. Here the
geometric ops go through `tf.raw_ops.ImageProjectiveTransformV3`, which has had
a constant fill value built in since TF 2.4, and every other op is written with
plain tensor ops.

Semantics follow the published RandAugment: each of `num_layers` layers picks
one of 16 ops uniformly and always applies it at the shared `magnitude`
(0..10 is the nominal range; larger values extrapolate). Geometric magnitudes
get a random sign. Constants: rotate 30 deg, shear 0.3, translate 100 px and
cutout half-size 40 px at magnitude 10; enhance factors 0.1 + 1.8 * m / 10;
empty pixels are filled with grey (128).

Two deliberate differences from the published code, both where it deviated from
the PIL operations it imitates: Contrast blends towards the mean grey level of
the image (the published version used pixel-count / 256, which depends on image
size); Posterize keeps at least 0 and at most 8 bits, so magnitudes above 20
mean "no posterize" instead of an invalid shift.
"""

import functools
import math
from typing import Optional

from nfnets_jax.data import rng
from nfnets_jax.data._tf import tf

MAX_LEVEL = 10.0
FILL_VALUE = 128
ROTATE_MAX_DEGREES = 30.0
SHEAR_MAX = 0.3
TRANSLATE_MAX_PIXELS = 100.0
CUTOUT_MAX_HALF_SIZE = 40
SOLARIZE_ADD_MAX = 110

OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
            "TranslateY", "Cutout", "SolarizeAdd")


# ---------------------------------------------------------------------------
# Single ops on uint8 [H, W, 3] images.

def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), clipped: factor 0 -> degenerate, 1 -> image."""
  a = tf.cast(degenerate, tf.float32)
  b = tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel so that its darkest pixel is 0 and brightest 255."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value((x - lo) * scale, 0.0, 255.0)
  return tf.cast(tf.where(hi > lo, stretched, x), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's histogram equalisation, per channel (all three at once via offset bins)."""
  x = tf.cast(image, tf.int32)
  channel_offset = tf.range(3, dtype=tf.int32) * 256
  flat = tf.reshape(x + channel_offset, [-1])
  hist = tf.reshape(tf.math.bincount(flat, minlength=768, maxlength=768), [3, 256])
  # PIL leaves out the count of the last non-empty bin (the brightest value).
  brightest = tf.reduce_max(tf.reshape(x, [-1, 3]), axis=0)
  last_count = tf.gather(hist, brightest, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # [3]
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(tf.concat([tf.zeros([3, 1], tf.int32), lut[:, :-1]], axis=1), 0, 255)
  equalized = tf.gather(tf.reshape(lut, [-1]), x + channel_offset)
  return tf.cast(tf.where(step > 0, equalized, x), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each value."""
  bits = min(max(int(bits), 0), 8)
  mask = (0xFF << (8 - bits)) & 0xFF
  return tf.bitwise.bitwise_and(image, tf.constant(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts every value at or above `threshold`."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` to every value below `threshold` (clipped)."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.clip_by_value(x + addition, 0, 255), x), tf.uint8)


def color(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Color (saturation): 0 is grey, 1 the original."""
  return blend(tf.image.grayscale_to_rgb(_grayscale(image)), image, factor)


def contrast(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Contrast: blends with a flat image at the mean grey level."""
  mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float32))
  return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Brightness: blends with black."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Sharpness: blends with PIL's SMOOTH-filtered image (borders unfiltered).

  SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, i.e.
  (3x3 box sum + 4 x centre) / 13; the box sum is two separable passes of
  shifted slices, several times faster on CPU than a depthwise convolution.
  """
  x = tf.cast(image, tf.float32)
  rows = x[:-2] + x[1:-1] + x[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  smooth = (box + 4.0 * x[1:-1, 1:-1]) / 13.0
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  interior = tf.pad(tf.ones_like(smooth, dtype=tf.bool), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(smooth, image, factor)


def transform(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Applies a projective transform given as the 8 coefficients mapping output to input pixels.

  For output pixel (x, y) the input pixel read is
  ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k) with k = c0 x + c1 y + 1;
  pixels that fall outside become grey.
  """
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
      output_shape=shape[:2], fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def rotate(image: tf.Tensor, degrees: float | tf.Tensor) -> tf.Tensor:
  """Rotates about the image centre (positive = counter-clockwise as displayed)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  cos, sin = tf.cos(radians), tf.sin(radians)
  # Each output pixel reads input = R (output - centre) + centre (x right, y down).
  return transform(image, tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                                    sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]))


def shear_x(image: tf.Tensor, level: float | tf.Tensor) -> tf.Tensor:
  level = tf.cast(level, tf.float32)
  return transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image: tf.Tensor, level: float | tf.Tensor) -> tf.Tensor:
  level = tf.cast(level, tf.float32)
  return transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image: tf.Tensor, pixels: float | tf.Tensor) -> tf.Tensor:
  """Moves the content `pixels` to the right."""
  dx = tf.cast(pixels, tf.float32)
  return transform(image, tf.stack([1.0, 0.0, -dx, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image: tf.Tensor, pixels: float | tf.Tensor) -> tf.Tensor:
  """Moves the content `pixels` down."""
  dy = tf.cast(pixels, tf.float32)
  return transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -dy, 0.0, 0.0]))


def cutout(image: tf.Tensor, half_size: int, seed: tf.Tensor) -> tf.Tensor:
  """Greys out a (2 half_size)^2 square centred uniformly in the image (clipped at borders)."""
  shape = tf.shape(image)
  sy, sx = rng.split_seed(seed, 2)
  cy = rng.randint(sy, shape[0])
  cx = rng.randint(sx, shape[1])
  # Inside: cy - half <= y < cy + half (and likewise for x), as a 2*half square.
  rows = tf.logical_and(tf.range(shape[0]) >= cy - half_size, tf.range(shape[0]) < cy + half_size)
  cols = tf.logical_and(tf.range(shape[1]) >= cx - half_size, tf.range(shape[1]) < cx + half_size)
  inside = tf.logical_and(rows[:, None], cols[None, :])[:, :, None]
  return tf.where(inside, tf.constant(FILL_VALUE, image.dtype), image)


# ---------------------------------------------------------------------------
# The policy.

def _signed(value: float, seed: tf.Tensor) -> tf.Tensor:
  """`value` with a random sign (50/50)."""
  return tf.where(rng.uniform(seed) < 0.5, -value, value)


def _enhance_factor(magnitude: float) -> float:
  return magnitude / MAX_LEVEL * 1.8 + 0.1


def _op_branches(image: tf.Tensor, magnitude: float, seed: tf.Tensor) -> list:
  """One zero-argument function per op in OP_NAMES, each applying it at `magnitude`."""
  m = magnitude / MAX_LEVEL
  f = _enhance_factor(magnitude)
  return [
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      lambda: rotate(image, _signed(m * ROTATE_MAX_DEGREES, seed)),
      lambda: posterize(image, int(m * 4)),
      lambda: solarize(image, int(m * 256)),
      lambda: color(image, f),
      lambda: contrast(image, f),
      lambda: brightness(image, f),
      lambda: sharpness(image, f),
      lambda: shear_x(image, _signed(m * SHEAR_MAX, seed)),
      lambda: shear_y(image, _signed(m * SHEAR_MAX, seed)),
      lambda: translate_x(image, _signed(m * TRANSLATE_MAX_PIXELS, seed)),
      lambda: translate_y(image, _signed(m * TRANSLATE_MAX_PIXELS, seed)),
      lambda: cutout(image, int(m * CUTOUT_MAX_HALF_SIZE), seed),
      lambda: solarize_add(image, int(m * SOLARIZE_ADD_MAX)),
  ]


def apply_op(image: tf.Tensor, op_index: tf.Tensor | int, magnitude: float,
             seed: tf.Tensor) -> tf.Tensor:
  """Applies op number `op_index` of OP_NAMES to a uint8 image."""
  out = tf.switch_case(tf.cast(op_index, tf.int32), _op_branches(image, float(magnitude), seed))
  out.set_shape(image.shape)
  return out


@functools.lru_cache(maxsize=None)
def _layer_function(magnitude: float, height: Optional[int], width: Optional[int]):
  """`apply_op` at `magnitude` as a tf.function, traced once and called by every layer.

  Tracing the 16-way `switch_case` is the expensive part of building a pipeline;
  a shared function traces it once instead of once per layer.
  """
  signature = [tf.TensorSpec([height, width, 3], tf.uint8), tf.TensorSpec([], tf.int32),
               tf.TensorSpec([2], tf.int64)]
  return tf.function(lambda image, op, seed: apply_op(image, op, magnitude, seed),
                     input_signature=signature, autograph=False)


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  """RandAugment on a uint8 [H, W, 3] image: `num_layers` random ops at `magnitude`."""
  if image.dtype != tf.uint8:
    raise TypeError(f"randaugment expects a uint8 image, got {image.dtype.name}")
  layer = _layer_function(float(magnitude), image.shape[0], image.shape[1])
  for op_index, op_seed in layer_choices(tf.cast(seed, tf.int64), num_layers):
    image = layer(image, op_index, op_seed)
  return image


def layer_choices(seed: tf.Tensor, num_layers: int) -> list[tuple[tf.Tensor, tf.Tensor]]:
  """(op index uniform over OP_NAMES, seed for the op's own randomness) for each layer."""
  choices = []
  for layer_seed in rng.split_seed(seed, max(num_layers, 1))[:num_layers]:
    pick_seed, op_seed = rng.split_seed(layer_seed, 2)
    choices.append((rng.randint(pick_seed, len(OP_NAMES)), op_seed))
  return choices


def randaugment_float(image: tf.Tensor, num_layers: int, magnitude: float,
                      seed: tf.Tensor) -> tf.Tensor:
  """RandAugment on a float image in about [0, 255] (clipped to it first, as published)."""
  as_uint8 = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
  return tf.cast(randaugment(as_uint8, num_layers, magnitude, seed), image.dtype)
