"""Augmentation contracts: names, RandAugment ops (checked against PIL), mixup and CutMix."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from nfnets_jax.data import augment_spec
from nfnets_jax.data.augment_spec import AugmentSpec, parse_augment_name

tf = pytest.importorskip("tensorflow")

from nfnets_jax.data import mixing, randaugment as ra, rng  # noqa: E402


# --- names -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    (None, AugmentSpec()),
    ("", AugmentSpec()),
    ("cutmix_mixup_randaugment_405", AugmentSpec(mixup=True, cutmix=True, randaugment_layers=4,
                                                 randaugment_magnitude=5)),
    ("mixup_cutmix", AugmentSpec(mixup=True, cutmix=True)),
    ("randaugment_410", AugmentSpec(randaugment_layers=4, randaugment_magnitude=10)),
    ("randaugment_5", AugmentSpec(randaugment_layers=2, randaugment_magnitude=5)),
    ("randaugment_15", AugmentSpec(randaugment_layers=2, randaugment_magnitude=15)),
    ("cutmix", AugmentSpec(cutmix=True)),
    ("mixup", AugmentSpec(mixup=True, mixup_alpha=0.2)),
    ("cutmix_mixup_0.4_randaugment_415", AugmentSpec(mixup=True, mixup_alpha=0.4, cutmix=True,
                                                     randaugment_layers=4,
                                                     randaugment_magnitude=15)),
])
def test_published_names_parse(name, expected):
  assert parse_augment_name(name) == expected


@pytest.mark.parametrize("name, culprit", [
    ("autoaugment", "autoaugment"), ("mixup_mixup", "twice"), ("randaugment", "integer level"),
    ("randaugment_abc", "integer level"), ("cutmix_0.5", "'0.5'"), ("randaugment_99", "99"),
    ("mixup_0", "alpha"), ("mix-up", "mix-up"),
])
def test_unknown_names_raise_listing_valid_forms(name, culprit):
  with pytest.raises(ValueError) as err:
    parse_augment_name(name)
  assert culprit in str(err.value) and "cutmix_mixup_randaugment_405" in str(err.value)
  assert repr(name) in str(err.value)


def test_mixes_property():
  assert parse_augment_name("mixup").mixes and parse_augment_name("cutmix").mixes
  assert not parse_augment_name("randaugment_5").mixes
  assert augment_spec.DEFAULT_MIXUP_ALPHA == 0.2


# --- RandAugment ops ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo() -> np.ndarray:
  """A smooth, non-constant test image (gradients plus noise) of odd size."""
  y, x = np.mgrid[0:33, 0:41]
  noise = np.random.default_rng(0).integers(0, 40, (33, 41, 3))
  img = np.stack([x * 5, y * 6, (x + y) * 3], -1) + noise
  return np.clip(img, 0, 255).astype(np.uint8)


def _seed(i=0):
  return tf.constant([7, i], tf.int64)


def test_every_op_keeps_shape_and_uint8(photo):
  for i, name in enumerate(ra.OP_NAMES):
    for magnitude in (0, 5, 10, 30):
      out = ra.apply_op(tf.constant(photo), i, magnitude, _seed(i)).numpy()
      assert out.shape == photo.shape and out.dtype == np.uint8, (name, magnitude)


def test_invert(photo):
  np.testing.assert_array_equal(ra.invert(tf.constant(photo)).numpy(), 255 - photo)


@pytest.mark.parametrize("op, pil", [
    (ra.equalize, ImageOps.equalize),
    (ra.autocontrast, ImageOps.autocontrast),
])
def test_histogram_ops_match_pil(photo, op, pil):
  expected = np.asarray(pil(Image.fromarray(photo)))
  got = op(tf.constant(photo)).numpy()
  assert np.abs(got.astype(int) - expected).max() <= 1


def test_equalize_and_autocontrast_leave_flat_images_alone():
  flat = np.full((5, 6, 3), 77, np.uint8)
  np.testing.assert_array_equal(ra.equalize(tf.constant(flat)).numpy(), flat)
  np.testing.assert_array_equal(ra.autocontrast(tf.constant(flat)).numpy(), flat)


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8])
def test_posterize_matches_pil(photo, bits):
  expected = np.asarray(ImageOps.posterize(Image.fromarray(photo), bits))
  np.testing.assert_array_equal(ra.posterize(tf.constant(photo), bits).numpy(), expected)


@pytest.mark.parametrize("threshold", [0, 64, 128, 256])
def test_solarize_matches_pil(photo, threshold):
  expected = np.asarray(ImageOps.solarize(Image.fromarray(photo), threshold))
  np.testing.assert_array_equal(ra.solarize(tf.constant(photo), threshold).numpy(), expected)


def test_solarize_add(photo):
  got = ra.solarize_add(tf.constant(photo), 60).numpy().astype(int)
  p = photo.astype(int)
  np.testing.assert_array_equal(got, np.where(p < 128, np.minimum(p + 60, 255), p))


@pytest.mark.parametrize("op, enhancer", [
    (ra.color, ImageEnhance.Color), (ra.contrast, ImageEnhance.Contrast),
    (ra.brightness, ImageEnhance.Brightness), (ra.sharpness, ImageEnhance.Sharpness),
])
@pytest.mark.parametrize("factor", [0.1, 1.0, 1.9])
def test_enhance_ops_match_pil(photo, op, enhancer, factor):
  expected = np.asarray(enhancer(Image.fromarray(photo)).enhance(factor)).astype(int)
  got = op(tf.constant(photo), factor).numpy().astype(int)
  # Rounding differs (PIL rounds, TF truncates; grey conversions round differently).
  assert np.abs(got - expected).max() <= 3
  assert np.abs(got - expected).mean() < 1.0


def test_rotate_quarter_turn_is_rot90_and_zero_is_identity():
  img = np.random.default_rng(1).integers(0, 256, (9, 9, 3), dtype=np.uint8)
  np.testing.assert_array_equal(ra.rotate(tf.constant(img), 0.0).numpy(), img)
  np.testing.assert_array_equal(ra.rotate(tf.constant(img), 90.0).numpy(), np.rot90(img, 1))


def test_translate_moves_content_and_fills_grey(photo):
  out = ra.translate_x(tf.constant(photo), 5).numpy()
  np.testing.assert_array_equal(out[:, 5:], photo[:, :-5])
  assert np.all(out[:, :5] == ra.FILL_VALUE)
  out = ra.translate_y(tf.constant(photo), -4).numpy()
  np.testing.assert_array_equal(out[:-4], photo[4:])
  assert np.all(out[-4:] == ra.FILL_VALUE)


@pytest.mark.parametrize("axis", [0, 1])
def test_whole_pixel_shift_equals_the_projective_translation(photo, axis):
  """RandAugment translates by whole pixels with a pad and a slice (`shift`); it must give
  what the projective transform gives (`translate_x`/`translate_y`), grey fill included."""
  translate = ra.translate_y if axis == 0 else ra.translate_x
  p = tf.constant(photo)
  for pixels in (-50, -3, 0, 7, 40):
    np.testing.assert_array_equal(ra.shift(p, pixels, axis, max_pixels=50).numpy(),
                                  translate(p, float(pixels)).numpy(), err_msg=str(pixels))
  op = ra.OP_NAMES.index("TranslateY" if axis == 0 else "TranslateX")
  for i in range(6):  # The layer (magnitude 3: 30 px, either sign) takes the shift path.
    got = ra.apply_op(p, op, 3, _seed(i)).numpy()
    assert any(np.array_equal(got, translate(p, sign * 30.0).numpy()) for sign in (1, -1))


def test_shear_matches_pil_affine(photo):
  level = 0.2
  expected = np.asarray(Image.fromarray(photo).transform(
      photo.shape[1::-1], Image.AFFINE, (1, level, 0, 0, 1, 0), fillcolor=(128, 128, 128)))
  got = ra.shear_x(tf.constant(photo), level).numpy()
  # Nearest-neighbour rounding may pick the neighbouring pixel on a few half-way points.
  assert np.mean(np.any(got != expected, axis=-1)) < 0.05
  np.testing.assert_array_equal(ra.shear_y(tf.constant(photo), 0.0).numpy(), photo)


def test_cutout_greys_a_square_of_the_expected_size():
  img = np.zeros((64, 64, 3), np.uint8)
  for i in range(20):
    out = ra.cutout(tf.constant(img), 6, _seed(i)).numpy()
    grey = np.all(out == ra.FILL_VALUE, axis=-1)
    rows, cols = np.flatnonzero(grey.any(1)), np.flatnonzero(grey.any(0))
    assert 0 < grey.sum() <= 12 * 12
    assert grey.sum() == len(rows) * len(cols)  # a (clipped) rectangle
    assert np.all(out[~grey] == 0)


def test_magnitudes_follow_published_scale(photo):
  # Posterize keeps int(m / 10 * 4) bits, Solarize thresholds at int(m / 10 * 256).
  p = tf.constant(photo)
  op = ra.OP_NAMES.index
  np.testing.assert_array_equal(ra.apply_op(p, op("Posterize"), 5, _seed()).numpy(),
                                ra.posterize(p, 2).numpy())
  np.testing.assert_array_equal(ra.apply_op(p, op("Solarize"), 5, _seed()).numpy(),
                                ra.solarize(p, 128).numpy())
  np.testing.assert_array_equal(ra.apply_op(p, op("Brightness"), 5, _seed()).numpy(),
                                ra.brightness(p, 1.0).numpy())
  rotated = ra.apply_op(p, op("Rotate"), 10, _seed()).numpy()
  assert any(np.array_equal(rotated, ra.rotate(p, sign * 30.0).numpy()) for sign in (1, -1))


def test_randaugment_is_seeded_and_zero_layers_is_identity(photo):
  p = tf.constant(photo)
  a = ra.randaugment(p, 4, 5, _seed(1)).numpy()
  np.testing.assert_array_equal(a, ra.randaugment(p, 4, 5, _seed(1)).numpy())
  outs = [ra.randaugment(p, 4, 5, _seed(i)).numpy() for i in range(2, 8)]
  assert any(not np.array_equal(a, o) for o in outs)
  np.testing.assert_array_equal(ra.randaugment(p, 0, 5, _seed(1)).numpy(), photo)


def test_randaugment_picks_every_op_uniformly():
  picks = tf.data.Dataset.range(800).map(
      lambda i: tf.stack([op for op, _ in ra.layer_choices(rng.example_seed(_seed(), i), 4)]))
  picks = np.stack(list(picks.as_numpy_iterator()))
  assert picks.shape == (800, 4)
  counts = np.bincount(picks.ravel(), minlength=len(ra.OP_NAMES))
  assert counts.min() > 3200 / 16 * 0.7 and counts.max() < 3200 / 16 * 1.3
  assert np.mean(picks[:, 0] == picks[:, 1]) < 0.15  # Layers choose independently.


def test_randaugment_float_clips_and_rejects_other_dtypes(photo):
  x = tf.constant(photo, tf.float32) * 1.2 - 20.0  # Outside [0, 255] like bicubic overshoot.
  out = ra.randaugment_float(x, 2, 9, _seed()).numpy()
  assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
  with pytest.raises(TypeError, match="uint8"):
    ra.randaugment(x, 2, 9, _seed())


# --- mixing ------------------------------------------------------------------------------

def _sample(fn, n):
  ds = tf.data.Dataset.range(n).map(lambda i: fn(rng.example_seed(_seed(99), i)))
  return np.stack(list(ds.batch(n).as_numpy_iterator())[0])


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_ratio_is_beta_alpha_alpha(alpha):
  r = _sample(lambda s: mixing.mixup_ratio(s, alpha), 6000)
  assert np.all((r >= 0) & (r <= 1))
  assert abs(r.mean() - 0.5) < 0.02
  assert abs(r.var() - 1 / (4 * (2 * alpha + 1))) < 0.01  # Var of Beta(a, a).
  if alpha < 1:  # U-shaped: most mass near 0 and 1.
    assert np.mean((r < 0.1) | (r > 0.9)) > 0.5


def test_cutmix_ratio_is_the_box_fraction_with_uniform_area():
  size = 64
  masks, ratios = [], []
  for m, r in tf.data.Dataset.range(3000).map(
      lambda i: mixing.cutmix_mask(rng.example_seed(_seed(5), i), size, size)).as_numpy_iterator():
    masks.append(m)
    ratios.append(r)
  masks, ratios = np.stack(masks), np.array(ratios)
  assert masks.shape == (3000, size, size, 1)
  assert set(np.unique(masks)) <= {0.0, 1.0}
  np.testing.assert_allclose(ratios, masks.mean(axis=(1, 2, 3)), atol=1e-6)
  # The unclipped box has area a ~ U(0, 1) and side s = sqrt(a); a uniform centre clips a
  # side to s - s^2/4 on average, so E[ratio] = E[(s - s^2/4)^2] = 1/2 - 1/5 + 1/48.
  assert abs(ratios.mean() - (0.5 - 0.2 + 1 / 48)) < 0.02
  assert ratios.min() < 0.01 and ratios.max() > 0.8


def _mix_stream(name, n, height=8, width=8):
  """Mixes n pairs of constant images (value = label) as the pipeline pairs them."""
  spec = parse_augment_name(name)
  outs = []
  for j in range(n):
    a = {"images": tf.fill([height, width, 3], float(2 * j + 1)), "labels": tf.constant(2 * j + 1)}
    b = {"images": tf.fill([height, width, 3], float(2 * j + 2)), "labels": tf.constant(2 * j + 2)}
    out = mixing.mix_pair(spec, a, b, _seed(j), mixing.uses_cutmix(spec, j, n))
    outs.append({k: v.numpy() for k, v in out.items()})
  return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup_cutmix"])
def test_mixed_pixels_agree_with_labels_and_ratio(name):
  n = 8
  out = _mix_stream(name, n)
  assert out["images"].shape == (n, 8, 8, 3)
  np.testing.assert_array_equal(out["labels"], 2 * np.arange(n) + 1)
  np.testing.assert_array_equal(out["mix_labels"], 2 * np.arange(n) + 2)
  # Each image holds ratio of `labels` and 1 - ratio of `mix_labels` (values = labels).
  expected_mean = out["ratio"] * out["labels"] + (1 - out["ratio"]) * out["mix_labels"]
  np.testing.assert_allclose(out["images"].mean(axis=(1, 2, 3)), expected_mean, rtol=1e-5)
  cutmix_rows = {"mixup": [], "cutmix": list(range(n)), "mixup_cutmix": list(range(n // 2, n))}
  for i in range(n):
    values = np.unique(out["images"][i])
    if i in cutmix_rows[name]:  # Pixels come whole from one image or the other.
      assert set(values) <= {out["labels"][i], out["mix_labels"][i]}
      assert float(out["ratio"][i] * 64).is_integer()
    else:
      assert len(values) == 1


def test_mixup_cutmix_split_follows_position_in_each_batch():
  spec = parse_augment_name("mixup_cutmix")
  flags = [bool(mixing.uses_cutmix(spec, j, 6)) for j in range(18)]
  assert flags == [False, False, False, True, True, True] * 3
  assert not any(bool(mixing.uses_cutmix(parse_augment_name("mixup"), j, 6)) for j in range(6))
  assert all(bool(mixing.uses_cutmix(parse_augment_name("cutmix"), j, 6)) for j in range(6))


def test_cutmix_pastes_exactly_the_mask_blend():
  """`mix_pair` pastes the box by slicing; that must be the definition's
  mask * a + (1 - mask) * b, with the mask's mean as the ratio, for any images."""
  spec = parse_augment_name("cutmix")
  noise = np.random.default_rng(3)
  for i in range(20):
    a = noise.normal(100, 80, (13, 19, 3)).astype(np.float32)
    b = noise.normal(100, 80, (13, 19, 3)).astype(np.float32)
    out = mixing.mix_pair(spec, {"images": tf.constant(a), "labels": 0},
                          {"images": tf.constant(b), "labels": 1}, _seed(i), True)
    _, cut_seed = rng.split_seed(_seed(i), 2)
    mask, ratio = (v.numpy() for v in mixing.cutmix_mask(cut_seed, 13, 19))
    np.testing.assert_array_equal(out["images"].numpy(), mask * a + (1 - mask) * b)
    assert out["ratio"].numpy() == ratio == mask.mean()
