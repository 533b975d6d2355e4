"""Mixup, CutMix and the published half-and-half combination.

The published pipeline batched 2B examples and mixed the first half with the
second, one batch-sized op per step. The pipeline (`mix_source`) pairs each
example a with a partner b in one of two ways, then mixes each pair by its own
parallel map call (spread over all tf.data threads):

* 'stream' (published): b is the next example of the (shuffled) stream, so
  each output consumes two examples, as the published 2B-for-B did;
* 'batch' (timm's way): b is another example of the same output batch (the
  batch rotated by half), so each output consumes one example and every example
  also serves as one other output's partner: half the decoding per output.

Both draw the ratios and the mixup/CutMix split the same way (`mix_pair`,
`uses_cutmix`, from the output's own seed and position), so the mixing
statistics are the same; only how often an image is seen per step differs.
Each pair a, b gives one output:

* mixup: images = r x_a + (1 - r) x_b with r ~ Beta(alpha, alpha);
* cutmix: x_a inside a box, x_b outside; the box has area fraction
  uniform in [0, 1] before clipping at the image border (Beta(1, 1) as in the
  CutMix paper) and a uniformly placed centre;
* mixup + cutmix: the first half of every output batch is mixup, the second
  half CutMix (the published split).

Every output carries `labels` (of x_a), `mix_labels` (of x_b) and `ratio`, the
weight of x_a: the mixup coefficient, or the exact fraction of pixels of x_a
after clipping. The loss is `ratio * CE(labels) + (1 - ratio) * CE(mix_labels)`.
"""

from typing import Mapping

from nfnets_jax.data import rng
from nfnets_jax.data._tf import tf
from nfnets_jax.data.augment_spec import AugmentSpec


def mixup_ratio(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """A Beta(alpha, alpha) sample, as the ratio of two Gamma(alpha) samples."""
  s1, s2 = rng.split_seed(seed, 2)
  g1 = tf.random.stateless_gamma([], s1, alpha=alpha, dtype=tf.float32)
  g2 = tf.random.stateless_gamma([], s2, alpha=alpha, dtype=tf.float32)
  total = g1 + g2
  # Both gammas underflow to 0 with probability ~1e-15 at alpha=0.2; call it a draw.
  return tf.where(total > 0, g1 / tf.maximum(total, 1e-30), 0.5)


def cutmix_box(seed: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """The CutMix box as [y0, y1, x0, x1] (rows y0..y1-1, columns x0..x1-1), clipped to the image.

  Its area fraction is uniform in [0, 1] before clipping, its centre uniform.
  """
  s_area, s_y, s_x = rng.split_seed(seed, 3)
  side = tf.sqrt(rng.uniform(s_area))  # Area fraction uniform in [0, 1].
  box_h = tf.cast(side * height, tf.int32)
  box_w = tf.cast(side * width, tf.int32)
  cy = rng.randint(s_y, height)
  cx = rng.randint(s_x, width)
  y0, x0 = cy - box_h // 2, cx - box_w // 2
  return tf.stack([tf.clip_by_value(y0, 0, height), tf.clip_by_value(y0 + box_h, 0, height),
                   tf.clip_by_value(x0, 0, width), tf.clip_by_value(x0 + box_w, 0, width)])


def box_fraction(box: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """The fraction of the image's pixels inside `box` (float32, as the mask's mean)."""
  area = (box[1] - box[0]) * (box[3] - box[2])
  return tf.cast(area, tf.float32) / float(height * width)


def cutmix_mask(seed: tf.Tensor, height: int, width: int) -> tuple[tf.Tensor, tf.Tensor]:
  """A [height, width, 1] float mask (1 inside `cutmix_box`) and its mean."""
  box = cutmix_box(seed, height, width)
  ys, xs = tf.range(height), tf.range(width)
  rows = tf.logical_and(ys >= box[0], ys < box[1])
  cols = tf.logical_and(xs >= box[2], xs < box[3])
  mask = tf.cast(tf.logical_and(rows[:, None], cols[None, :]), tf.float32)[:, :, None]
  return mask, box_fraction(box, height, width)


def paste_box(inside: tf.Tensor, outside: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  """`inside` within `box`, `outside` elsewhere: mask * inside + (1 - mask) * outside for a
  0/1 mask, by slicing (only the box's rows are rebuilt) rather than three image passes."""
  band = tf.concat([outside[box[0]:box[1], :box[2]], inside[box[0]:box[1], box[2]:box[3]],
                    outside[box[0]:box[1], box[3]:]], axis=1)
  return tf.concat([outside[:box[0]], band, outside[box[1]:]], axis=0)


def mix_pair(spec: AugmentSpec, a: Mapping[str, tf.Tensor], b: Mapping[str, tf.Tensor],
             seed: tf.Tensor, use_cutmix: tf.Tensor | bool) -> dict[str, tf.Tensor]:
  """Mixes example `b` into example `a` (each {'images': [H, W, C], 'labels': []}).

  Uses CutMix where `use_cutmix` (a scalar bool, only consulted when `spec` has
  both) and mixup otherwise. Returns images, labels (a's), mix_labels (b's) and
  ratio (the weight of a).
  """
  shape = a["images"].shape
  height, width = int(shape[0]), int(shape[1])
  mix_seed, cut_seed = rng.split_seed(seed, 2)

  def mixup():
    r = mixup_ratio(mix_seed, spec.mixup_alpha)
    return r * a["images"] + (1.0 - r) * b["images"], r

  def cutmix():
    box = cutmix_box(cut_seed, height, width)
    return paste_box(a["images"], b["images"], box), box_fraction(box, height, width)

  if spec.mixup and spec.cutmix:
    images, ratio = tf.cond(tf.convert_to_tensor(use_cutmix), cutmix, mixup)
  elif spec.mixup:
    images, ratio = mixup()
  elif spec.cutmix:
    images, ratio = cutmix()
  else:
    raise ValueError("mix_pair needs an AugmentSpec with mixup or cutmix")
  images.set_shape(shape)
  return {"images": images, "labels": a["labels"], "mix_labels": b["labels"], "ratio": ratio}


def uses_cutmix(spec: AugmentSpec, pair_index: tf.Tensor, batch_size: int) -> tf.Tensor:
  """Whether pair `pair_index` of the stream is CutMix: the second half of each output batch
  when mixing both ways (the published split), all or none otherwise."""
  if spec.mixup and spec.cutmix:
    return tf.cast(pair_index, tf.int64) % batch_size >= batch_size // 2
  return tf.constant(spec.cutmix)
