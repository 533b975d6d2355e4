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

def _as_rows(image: tf.Tensor) -> tf.Tensor:
  """[H, W, C] -> float32 [H, W * C], so that per-channel values tiled to a row
  (`_row_vector`) broadcast over rows: TF's CPU kernels run that several times
  faster than a [C] vector broadcast over a trailing axis."""
  shape = tf.shape(image)
  return tf.reshape(tf.cast(image, tf.float32), [shape[0], shape[1] * shape[2]])


def _from_rows(rows: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """The inverse of `_as_rows`, truncated back to uint8 (values already in [0, 255])."""
  return tf.reshape(tf.cast(rows, tf.uint8), tf.shape(like))


def _row_vector(per_channel: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
  """A [C] vector tiled to one image row, [W * C]."""
  return tf.tile(tf.cast(per_channel, tf.float32), tf.shape(image)[1:2])


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), clipped: factor 0 -> degenerate, 1 -> image."""
  a = tf.cast(degenerate, tf.float32)
  b = tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel so that its darkest pixel is 0 and brightest 255.

  A flat channel keeps its values: its offset is 0 and its scale 1 (x - 0) * 1 = x.
  """
  channels = tf.reshape(image, [-1, tf.shape(image)[2]])
  lo = tf.cast(tf.reduce_min(channels, axis=0), tf.float32)
  hi = tf.cast(tf.reduce_max(channels, axis=0), tf.float32)
  flat = hi <= lo
  lo = tf.where(flat, 0.0, lo)
  scale = tf.where(flat, 1.0, 255.0 / tf.maximum(hi - lo, 1.0))
  rows = (_as_rows(image) - _row_vector(lo, image)) * _row_vector(scale, image)
  return _from_rows(tf.clip_by_value(rows, 0.0, 255.0), image)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's histogram equalisation, per channel, as a lookup table per channel."""
  x = tf.cast(image, tf.int32)
  hist = tf.stack([tf.histogram_fixed_width(x[:, :, c], [0, 256], nbins=256) for c in range(3)])
  # PIL leaves out the count of the last non-empty bin (the brightest value).
  brightest = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [1]), axis=1,
                              output_type=tf.int32)
  last_count = tf.gather(hist, brightest, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # [3]
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(tf.concat([tf.zeros([3, 1], tf.int32), lut[:, :-1]], axis=1), 0, 255)
  # A channel with a single non-empty bin (step 0) maps through the identity.
  lut = tf.where((step > 0)[:, None], lut, tf.range(256)[None, :])
  offsets = tf.tile(tf.range(0, 768, 256), tf.shape(image)[1:2])
  index = tf.reshape(x, [tf.shape(x)[0], -1]) + offsets
  return tf.reshape(tf.gather(tf.cast(tf.reshape(lut, [-1]), tf.uint8), index), tf.shape(image))


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each value."""
  bits = min(max(int(bits), 0), 8)
  mask = (0xFF << (8 - bits)) & 0xFF
  return tf.bitwise.bitwise_and(image, tf.constant(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts every value at or above `threshold`.

  As x + [x >= t] (255 - 2x) in float32: exact on integers, and TF's CPU kernels
  run these arithmetic passes faster than one uint8 `where`.
  """
  x = tf.cast(image, tf.float32)
  above = tf.cast(x >= float(threshold), tf.float32)
  return tf.cast(x + above * (255.0 - 2.0 * x), tf.uint8)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` to every value below `threshold` (clipped), in exact float32 arithmetic."""
  x = tf.cast(image, tf.float32)
  below = tf.cast(x < float(threshold), tf.float32)
  added = tf.clip_by_value(x + float(addition), 0.0, 255.0)
  return tf.cast(x + below * (added - x), tf.uint8)


def color(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Color (saturation): 0 is grey, 1 the original."""
  return blend(tf.image.grayscale_to_rgb(_grayscale(image)), image, factor)


def contrast(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Contrast: blends with a flat image at the mean grey level (a scalar, not an image)."""
  mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float32))
  return blend(mean, image, factor)


def brightness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Brightness: blends with black, i.e. factor * image clipped (0 + f (x - 0) exactly)."""
  return tf.cast(tf.clip_by_value(factor * tf.cast(image, tf.float32), 0.0, 255.0), tf.uint8)


def sharpness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """PIL Sharpness: blends with PIL's SMOOTH-filtered image (borders unfiltered).

  SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, i.e.
  (3x3 box sum + 4 x centre) / 13; the box sum is two separable passes of
  shifted slices, several times faster on CPU than a depthwise convolution.
  Only the interior is blended: on the border the smoothed image is the image,
  and a blend of an image with itself is that image.
  """
  x = tf.cast(image, tf.float32)
  rows = x[:-2] + x[1:-1] + x[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  centre = x[1:-1, 1:-1]
  smooth = tf.floor(tf.clip_by_value((box + 4.0 * centre) / 13.0, 0.0, 255.0))
  interior = tf.cast(tf.clip_by_value(smooth + factor * (centre - smooth), 0.0, 255.0), tf.uint8)
  middle = tf.concat([image[1:-1, :1], interior, image[1:-1, -1:]], axis=1)
  return tf.concat([image[:1], middle, image[-1:]], axis=0)


def transform(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Applies a projective transform given as the 8 coefficients mapping output to input pixels.

  For output pixel (x, y) the input pixel read is
  ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k) with k = c0 x + c1 y + 1;
  pixels that fall outside become grey.
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
      output_shape=_height_width(image), fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation="NEAREST", fill_mode="CONSTANT")
  return tf.squeeze(out, 0)


def _height_width(image: tf.Tensor):
  """[height, width]: Python ints where the shape is static (no graph nodes), else a tensor."""
  if image.shape[0] is not None and image.shape[1] is not None:
    return [int(image.shape[0]), int(image.shape[1])]
  return tf.shape(image)[:2]


def rotation_matrix(height, width, degrees: float | tf.Tensor) -> tf.Tensor:
  """The `transform` matrix of a rotation about the image centre by `degrees`."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cy, cx = (tf.cast(height, tf.float32) - 1) / 2, (tf.cast(width, tf.float32) - 1) / 2
  cos, sin = tf.cos(radians), tf.sin(radians)
  # Each output pixel reads input = R (output - centre) + centre (x right, y down).
  return tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                   sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def shear_matrix(level: float | tf.Tensor, axis: int) -> tf.Tensor:
  """The `transform` matrix of a shear along x (axis 1) or y (axis 0)."""
  level = tf.cast(level, tf.float32)
  return tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 1 else
                  [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translation_matrix(pixels: float | tf.Tensor, axis: int) -> tf.Tensor:
  d = tf.cast(pixels, tf.float32)
  return tf.stack([1.0, 0.0, -d, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 1 else
                  [1.0, 0.0, 0.0, 0.0, 1.0, -d, 0.0, 0.0])


def rotate(image: tf.Tensor, degrees: float | tf.Tensor) -> tf.Tensor:
  """Rotates about the image centre (positive = counter-clockwise as displayed)."""
  hw = tf.shape(image)
  return transform(image, rotation_matrix(hw[0], hw[1], degrees))


def shear_x(image: tf.Tensor, level: float | tf.Tensor) -> tf.Tensor:
  return transform(image, shear_matrix(level, axis=1))


def shear_y(image: tf.Tensor, level: float | tf.Tensor) -> tf.Tensor:
  return transform(image, shear_matrix(level, axis=0))


def shift(image: tf.Tensor, pixels: int | tf.Tensor, axis: int, max_pixels: int) -> tf.Tensor:
  """Moves the content by a whole number of `pixels` (|pixels| <= max_pixels) along `axis`
  (0: down, 1: right), grey coming in.

  What `transform` computes for a whole-pixel translation (nearest-neighbour
  reads of x - d), as one pad and one slice instead of a per-pixel resampling.
  """
  pad = max(int(max_pixels), 0)
  paddings = [[0, 0]] * 3
  paddings[axis] = [pad, pad]
  padded = tf.pad(image, paddings, constant_values=tf.constant(FILL_VALUE, image.dtype))
  begin = tf.one_hot(axis, 3, on_value=pad - tf.cast(pixels, tf.int32), off_value=0)
  out = tf.slice(padded, begin, tf.shape(image))
  out.set_shape(image.shape)
  return out


def translate_x(image: tf.Tensor, pixels: float | tf.Tensor) -> tf.Tensor:
  """Moves the content `pixels` to the right."""
  return transform(image, translation_matrix(pixels, axis=1))


def translate_y(image: tf.Tensor, pixels: float | tf.Tensor) -> tf.Tensor:
  """Moves the content `pixels` down."""
  return transform(image, translation_matrix(pixels, axis=0))


def cutout(image: tf.Tensor, half_size: int, seed: tf.Tensor) -> tf.Tensor:
  """Greys out a (2 half_size)^2 square centred uniformly in the image (clipped at borders)."""
  shape = tf.shape(image)
  sy, sx = rng.split_seed(seed, 2)
  cy = rng.randint(sy, shape[0])
  cx = rng.randint(sx, shape[1])
  # Inside: cy - half <= y < cy + half (and likewise for x), as a 2*half square.
  y0 = tf.clip_by_value(cy - half_size, 0, shape[0])
  y1 = tf.clip_by_value(cy + half_size, 0, shape[0])
  x0 = tf.clip_by_value(cx - half_size, 0, shape[1])
  x1 = tf.clip_by_value(cx + half_size, 0, shape[1])
  # Only the square's rows are rewritten; the rest of the image is copied as it is.
  band = image[y0:y1]
  grey = tf.fill(tf.stack([y1 - y0, x1 - x0, shape[2]]), tf.constant(FILL_VALUE, image.dtype))
  band = tf.concat([band[:, :x0], grey, band[:, x1:]], axis=1)
  out = tf.concat([image[:y0], band, image[y1:]], axis=0)
  out.set_shape(image.shape)
  return out


# ---------------------------------------------------------------------------
# The policy.

def _signed(value: float, seed: tf.Tensor) -> tf.Tensor:
  """`value` with a random sign (50/50)."""
  return tf.where(rng.uniform(seed) < 0.5, -value, value)


def _signed_constant(make, value: float, seed: tf.Tensor) -> tf.Tensor:
  """`make(-value)` or `make(value)` (50/50, the same draw as `_signed`), both computed
  once, when the graph is built, by the same TF ops a graph would run."""
  with tf.init_scope():
    negative, positive = make(-value).numpy(), make(value).numpy()
  return tf.where(rng.uniform(seed) < 0.5, negative, positive)


def _enhance_factor(magnitude: float) -> float:
  return magnitude / MAX_LEVEL * 1.8 + 0.1


def _translate(image: tf.Tensor, pixels: float, axis: int, seed: tf.Tensor) -> tf.Tensor:
  """Translation by `pixels` with a random sign; by slicing when the shift is whole pixels
  (every integer magnitude) and the image size is known."""
  side = image.shape[axis]
  if float(pixels).is_integer() and side is not None:
    pixels = min(int(pixels), int(side))
    return shift(image, _signed(pixels, seed), axis, pixels)
  return transform(image, _signed_constant(lambda v: translation_matrix(v, axis), pixels, seed))


def _op_branches(image: tf.Tensor, magnitude: float, seed: tf.Tensor) -> list:
  """One zero-argument function per op in OP_NAMES, each applying it at `magnitude`.

  Kept small in graph nodes: a `switch_case` costs time in proportion to the
  nodes of all its branches on every call, taken or not, so the geometric
  matrices of static-size images are built once as constants.
  """
  m = magnitude / MAX_LEVEL
  f = _enhance_factor(magnitude)
  static = image.shape[0] is not None and image.shape[1] is not None

  def rotate_branch():
    degrees = m * ROTATE_MAX_DEGREES
    if not static:
      return rotate(image, _signed(degrees, seed))
    height, width = int(image.shape[0]), int(image.shape[1])
    return transform(image, _signed_constant(lambda v: rotation_matrix(height, width, v),
                                             degrees, seed))

  def shear_branch(axis):
    return transform(image, _signed_constant(lambda v: shear_matrix(v, axis), m * SHEAR_MAX,
                                             seed))

  return [
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      rotate_branch,
      lambda: posterize(image, int(m * 4)),
      lambda: solarize(image, int(m * 256)),
      lambda: color(image, f),
      lambda: contrast(image, f),
      lambda: brightness(image, f),
      lambda: sharpness(image, f),
      lambda: shear_branch(1),
      lambda: shear_branch(0),
      lambda: _translate(image, m * TRANSLATE_MAX_PIXELS, 1, seed),
      lambda: _translate(image, m * TRANSLATE_MAX_PIXELS, 0, seed),
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
