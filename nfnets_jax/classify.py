"""The top classes of a few images, with a checkpoint.

  python -m nfnets_jax.classify --checkpoint=F0_safe.npz --model=nfnet:F0 cat.jpg dog.png
  python -m nfnets_jax.classify --checkpoint=/tmp/workdir --ema --json photo.jpg

Each image gets the evaluation preprocessing a training workdir (or timm's
weights) records (else the published one of the model: resize to its test
resolution + 32 px, centre-crop, ImageNet normalisation;
--image_size/--eval_preproc/--normalization change it), exactly as
`nfnets_jax.evaluate` scores a dataset; stderr says where each setting came
from. Prints, per image, the top-5 classes with their probabilities: the class
names the training run recorded (its dataset's: folder names, TFDS label
names), else ImageNet synset ID and name for 1000-class models, else the class
index. JPEG, PNG and whatever else Pillow reads (GIF, BMP, WebP, TIFF);
grayscale, palette, RGBA and CMYK images are converted to RGB, and EXIF
rotations applied. An image that is missing or cannot be decoded is reported
by name on stderr, the others are still classified, and the exit status is 1.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import json
import pathlib
import sys
from typing import Any, Optional, Sequence

import numpy as np

from nfnets_jax import cli, weights
from nfnets_jax.cli import model_flags, runtime
from nfnets_jax.data import preproc_spec
from nfnets_jax.weights import loading

#: Synset ID -> WordNet lemma of the 1000 ImageNet-1k classes, in TFDS label order.
CLASS_NAMES_RESOURCE = "resources/imagenet_class_names.json"
IMAGENET_NUM_CLASSES = 1000
DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 8
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
  """An image file that cannot be read or decoded."""


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One of an image's top classes."""
  index: int
  probability: float
  synset: Optional[str] = None
  name: Optional[str] = None

  def label(self) -> str:
    if self.synset:
      return f"{self.synset}  {self.name}"
    return self.name if self.name is not None else f"class {self.index}"


def imagenet_classes() -> list[tuple[str, str]]:
  """The (synset ID, name) of each ImageNet-1k label, index = TFDS `imagenet2012` label."""
  text = importlib.resources.files("nfnets_jax").joinpath(CLASS_NAMES_RESOURCE).read_text("utf-8")
  classes = list(json.loads(text).items())
  if len(classes) != IMAGENET_NUM_CLASSES:
    raise ValueError(f"{CLASS_NAMES_RESOURCE} lists {len(classes)} classes, not "
                     f"{IMAGENET_NUM_CLASSES}: the installed package is damaged.")
  return classes


def class_table(loaded: weights.LoadedModel) -> tuple[Optional[list[tuple[Optional[str], str]]],
                                                      str]:
  """The (synset, name) of each label and where they came from (an origin of `weights.loading`).

  Names a training run recorded come first; recorded ImageNet synsets get their
  WordNet names. Without a record a 1000-class model gets ImageNet's; otherwise
  there are none (None) and labels print as indices.
  """
  recorded = loaded.class_names
  if recorded:
    imagenet = imagenet_classes()
    if recorded == [synset for synset, _ in imagenet]:
      return imagenet, loading.RECORD
    return [(None, name) for name in recorded], loading.RECORD
  if loaded.num_classes == IMAGENET_NUM_CLASSES:
    return imagenet_classes(), loading.DEFAULT
  return None, loading.DEFAULT


def read_image(path: str | pathlib.Path) -> bytes:
  """Encoded bytes of `path` that the evaluation preprocessing decodes to its RGB pixels.

  JPEGs (grayscale or RGB) and PNGs (any mode) pass through untouched, so TF
  decodes them exactly as in `nfnets_jax.data`; other formats and modes (CMYK,
  GIF, WebP, ...) and EXIF-rotated photos are decoded by Pillow, converted to
  RGB and handed on as lossless PNG.

  Raises:
    ImageError: the file is missing, unreadable, or not a decodable image.
  """
  from PIL import Image, ImageOps, UnidentifiedImageError

  try:
    raw = pathlib.Path(path).read_bytes()
  except FileNotFoundError:
    raise ImageError("no such file") from None
  except IsADirectoryError:
    raise ImageError("is a directory, not an image file") from None
  except OSError as err:
    raise ImageError(f"cannot read it ({err.strerror or err})") from None
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()  # Decodes everything: a truncated or damaged file fails here.
      native = image.format == "PNG" or (image.format == "JPEG" and image.mode in ("L", "RGB"))
      if native and image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
        return raw
      rgb = ImageOps.exif_transpose(image).convert("RGB")
  except UnidentifiedImageError:
    raise ImageError("not an image file Pillow recognises (JPEG, PNG, GIF, BMP, WebP, "
                     "TIFF, ...)") from None
  except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for damaged data.
    raise ImageError(f"cannot decode it ({err})") from None
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return buffer.getvalue()


def preprocess(image_bytes: bytes, image_size: int, eval_preproc: str,
               normalization: str = preproc_spec.DEFAULT_NORMALIZATION) -> np.ndarray:
  """The evaluation pipeline's preprocessing of one image: float32 [H, W, 3], normalised."""
  from nfnets_jax.data import preprocess as preprocess_lib
  from nfnets_jax.data._tf import tf

  try:
    image = preprocess_lib.eval_image(tf.constant(image_bytes), (image_size, image_size),
                                      eval_preproc)
    return preprocess_lib.normalize(image, normalization).numpy()
  except tf.errors.OpError as err:
    raise ImageError(f"cannot decode it ({err.message.splitlines()[0]})") from None


def make_predict_fn(loaded: weights.LoadedModel, compute_dtype: Any = "float32"):
  """A jitted `images [N, H, W, 3] -> probabilities [N, num_classes]` (float32).

  It runs the folded network (`models.fold_for_inference`), which is faster
  than the training form at the few images per call this tool sees
  (docs/performance.md).
  """
  import jax
  import jax.numpy as jnp

  loaded.transform()  # The same clear errors as the other tools for a model that cannot run.
  folded = loaded.fold()
  dtype = jnp.dtype(compute_dtype)
  params = jax.device_put(folded.params)

  @jax.jit
  def probabilities(params, images):
    logits = folded.apply(params, images.astype(dtype))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return lambda images: np.asarray(probabilities(params, images))


def top_predictions(probabilities: np.ndarray, k: int,
                    classes: Optional[list[tuple[str, str]]] = None) -> list[Prediction]:
  """The `k` most probable classes of one probability vector, most probable first."""
  order = np.argsort(-probabilities, kind="stable")[:k]
  out = []
  for index in order:
    synset, name = (classes[index] if classes is not None and index < len(classes)
                    else (None, None))
    out.append(Prediction(int(index), float(probabilities[index]), synset, name))
  return out


def classify_images(loaded: weights.LoadedModel, paths: Sequence[str], *, image_size: int,
                    eval_preproc: str = model_flags.DEFAULT_EVAL_PREPROC,
                    normalization: Optional[str] = None,
                    top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH_SIZE,
                    compute_dtype: Any = "float32",
                    on_error=None) -> tuple[dict[str, list[Prediction]], dict[str, str]]:
  """Top-k predictions for each readable image in `paths`, and the reason for each failure.

  Images run in batches of `batch_size` (the last one padded), so the network
  compiles once. `on_error(path, reason)` is called as each failure is found.
  Classes are named as `class_table` says. `normalization` defaults to the one `loaded`
  records (timm's weights record theirs), else 'imagenet'.

  Returns:
    ({path: predictions}, {path: reason}), both in the order of `paths`.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if normalization is None:
    normalization = loaded.normalization
  classes, _ = class_table(loaded)
  ready, failed = [], {}
  for path in paths:
    try:
      ready.append((path, preprocess(read_image(path), image_size, eval_preproc,
                                     normalization)))
    except ImageError as err:
      failed[path] = str(err)
      if on_error is not None:
        on_error(path, str(err))
  results: dict[str, list[Prediction]] = {}
  if not ready:
    return results, failed
  predict = make_predict_fn(loaded, compute_dtype)
  size = min(batch_size, len(ready))
  k = min(top_k, loaded.num_classes)
  for start in range(0, len(ready), size):
    chunk = ready[start:start + size]
    images = np.zeros((size,) + chunk[0][1].shape, np.float32)
    images[:len(chunk)] = np.stack([image for _, image in chunk])
    probabilities = predict(images)
    for (path, _), probs in zip(chunk, probabilities):
      results[path] = top_predictions(probs, k, classes)
  return results, failed


# ----------------------------------------------------------------------------- CLI


def _define_flags():
  """A private flag set, so this tool can share a process with other CLIs."""
  from absl import flags

  fv = flags.FlagValues()
  model_flags.define_model_flags(fv)
  flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Classes to show per image.", flag_values=fv)
  flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Images per forward pass.",
                       flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object with every result instead of text.",
                    flag_values=fv)
  runtime_flags = runtime.define_flags(fv, distributed=False)
  return fv, runtime_flags


def _as_json(loaded: weights.LoadedModel, settings: weights.Settings,
             paths: Sequence[str], results: dict[str, list[Prediction]],
             failed: dict[str, str]) -> str:
  return json.dumps({
      "model": loaded.name,
      "checkpoint": loaded.source,
      "num_classes": loaded.num_classes,
      "image_size": settings["image_size"],
      "eval_preproc": settings["eval_preproc"],
      "normalization": settings["normalization"],
      "ema": settings["ema"],
      "settings_from": settings.origins,
      "results": [{"image": path, "predictions": [dataclasses.asdict(p) for p in results[path]]}
                  for path in paths if path in results],
      "errors": [{"image": path, "error": failed[path]} for path in paths if path in failed],
  })


def _as_text(paths: Sequence[str], results: dict[str, list[Prediction]]) -> str:
  lines = []
  for path in paths:
    if path in results:
      lines.append(f"{path}:")
      lines += [f"  {rank}  {p.probability:.4f}  {p.label()}"
                for rank, p in enumerate(results[path], 1)]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Classifies the images named in `argv` (program name first); returns the exit code.

  Exit statuses as `nfnets_jax.cli` documents them; 1 also when any image
  could not be classified (the others still are).
  """
  fv, runtime_flags = _define_flags()
  return cli.run_tool(argv, fv, __doc__ or "",
                      lambda paths: _classify_from_flags(fv, runtime_flags, paths), positional=True)


def _classify_from_flags(fv, runtime_flags: runtime.RuntimeFlags, paths: list[str]) -> int:
  """Classifies `paths` with the checkpoint the parsed flags name; prints the results."""
  if not paths:
    raise cli.UsageError("Name at least one image file to classify.")
  if fv.top_k < 1:
    raise cli.UsageError(f"--top_k must be >= 1, got {fv.top_k}.")
  if fv.batch_size < 1:
    raise cli.UsageError(f"--batch_size must be >= 1, got {fv.batch_size}.")
  runtime.setup(runtime_flags)
  loaded = model_flags.load_model_from_flags(fv)
  settings = model_flags.eval_settings_from_flags(fv, loaded)
  classes, origin = class_table(loaded)
  settings.set("class_names", [name for _, name in classes] if classes else "class indices",
               origin)
  print(settings.describe(), file=sys.stderr, flush=True)

  def report(path: str, reason: str) -> None:
    print(f"error: {path}: {reason}", file=sys.stderr, flush=True)

  results, failed = classify_images(
      loaded, paths, image_size=settings["image_size"], eval_preproc=settings["eval_preproc"],
      normalization=settings["normalization"], top_k=fv.top_k,
      batch_size=fv.batch_size, compute_dtype=fv.compute_dtype, on_error=report)
  if fv.json:
    print(_as_json(loaded, settings, paths, results, failed))
  elif results:
    print(_as_text(paths, results))
  if failed:
    print(f"{len(failed)} of {len(paths)} images could not be classified: "
          f"{', '.join(failed)}", file=sys.stderr)
    return cli.EXIT_FAILURE
  return cli.EXIT_OK


if __name__ == "__main__":
  cli.run(main)
