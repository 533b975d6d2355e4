"""Parsing of the preprocessing settings: image sizes, `train_preproc`, `eval_preproc`.

Like `augment_spec`, this module holds the string contracts of the input
pipeline without TensorFlow, so that the trainer, `evaluate` and `classify`
can refuse a misspelt setting in the second a command starts, rather than
after TensorFlow's import and the model's initialisation. `preprocess`
applies what these parse.
"""

from typing import Sequence

MAX_IMAGE_SIDE = 8192

#: The ImageNet normalisation (per RGB channel, 0..255 scale): the published NFNets' and the
#: default of every pipeline and export.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

#: Per-channel (mean, std) on the 0..255 scale, by the name a `normalization` setting takes.
#: A network sees its inputs as it was trained on them: 'imagenet' for the published NFNets and
#: most of timm's weights, 'inception' (0.5 and 0.5 on the 0..1 scale, timm's
#: IMAGENET_INCEPTION_MEAN/STD) for weights trained that way, such as timm's test_nfnet.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (MEAN_RGB, STDDEV_RGB),
    "inception": ((127.5,) * 3, (127.5,) * 3),
}
DEFAULT_NORMALIZATION = "imagenet"

#: Training preprocessings: the published Inception crop + flip, or a plain resize
#: of the whole image for data where crops and mirror images change the class
#: (the 8x8 digits: a 3x3 crop or a mirrored 2 is no longer that digit).
TRAIN_PREPROCS = ("inception_crop", "resize")

EVAL_PREPROC_FORMS = ("eval_preproc must be 'crop_resize', 'resize_crop_<pct>' or "
                      "'center_crop_<fraction>', where pct > 1 is a margin in pixels (e.g. "
                      "'resize_crop_32': resize to image_size + 32, then centre-crop) and "
                      "0 < pct <= 1 a fraction (e.g. 'resize_crop_0.875': resize to image_size / "
                      "0.875, then centre-crop); 'center_crop_0.9' resizes the shorter side to "
                      "image_size / 0.9 keeping the aspect ratio (timm's 'center' crop), then "
                      "centre-crops")


def image_size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  """Validates `image_size` (an int or (height, width)) and returns (height, width)."""
  sides = (image_size, image_size) if isinstance(image_size, int) else image_size
  try:
    sides = tuple(sides)
  except TypeError:
    sides = ()
  ok = (len(sides) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in sides)
        and all(1 <= s <= MAX_IMAGE_SIDE for s in sides))
  if not ok:
    raise ValueError(f"image_size must be a positive int or a (height, width) pair of ints in "
                     f"[1, {MAX_IMAGE_SIDE}], got {image_size!r}")
  return sides  # type: ignore[return-value]


def parse_eval_preproc(eval_preproc: str) -> tuple[str, float]:
  """'crop_resize' -> ('crop_resize', 0); 'resize_crop_32' -> ('resize_crop', 32.0);
  'center_crop_0.95' -> ('center_crop', 0.95)."""
  if eval_preproc == "crop_resize":
    return "crop_resize", 0.0
  for method, upper in (("resize_crop", float("inf")), ("center_crop", 1.0)):
    prefix = method + "_"
    if isinstance(eval_preproc, str) and eval_preproc.startswith(prefix):
      try:
        pct = float(eval_preproc[len(prefix):])
      except ValueError:
        pct = float("nan")
      if 0 < pct <= upper:  # False for nan.
        return method, pct
  raise ValueError(f"Unknown eval_preproc {eval_preproc!r}: {EVAL_PREPROC_FORMS}.")


def resize_crop_scaled_size(image_size: tuple[int, int], pct: float) -> tuple[int, int]:
  """The size 'resize_crop_{pct}' resizes to before its centre crop."""
  if pct > 1:
    return tuple(int(s + pct) for s in image_size)  # type: ignore[return-value]
  return tuple(int(s / pct) for s in image_size)  # type: ignore[return-value]


def normalization_stats(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """'imagenet' -> its per-channel (mean, std) on the 0..255 scale; a ValueError for a name
  that is not in `NORMALIZATIONS`."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {normalization!r}; valid: "
                     f"{', '.join(NORMALIZATIONS)}.")
  return NORMALIZATIONS[normalization]


def normalization_named(mean: Sequence[float], std: Sequence[float]) -> str:
  """The name of the normalisation with per-channel `mean` and `std` on the 0..1 scale
  (timm's convention), or a ValueError listing the ones this project applies."""
  for name, (m, s) in NORMALIZATIONS.items():
    if all(abs(a * 255 - b) < 1e-6 for a, b in zip((*mean, *std), (*m, *s), strict=True)):
      return name
  raise ValueError(f"No normalization has mean {tuple(mean)} and std {tuple(std)} (0..1 scale); "
                   f"known: " + ", ".join(
                       f"{n} (mean {tuple(round(v / 255, 4) for v in m)}, std "
                       f"{tuple(round(v / 255, 4) for v in s)})"
                       for n, (m, s) in NORMALIZATIONS.items()) + ".")


def check_train_preproc(train_preproc: str) -> str:
  """Returns `train_preproc` if it names one of `TRAIN_PREPROCS`; else a ValueError."""
  if train_preproc not in TRAIN_PREPROCS:
    raise ValueError(f"Unknown train_preproc {train_preproc!r}; valid: {', '.join(TRAIN_PREPROCS)}.")
  return train_preproc
