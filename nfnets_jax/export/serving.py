"""The function an exported model computes: a folded network, optionally with preprocessing.

Two contracts (docs/export.md):

* plain: float NHWC images already preprocessed (resized, cropped, normalised
  with the weights' statistics, ImageNet's unless they record others),
  `image_size` square -> float32 logits;
* with preprocessing: uint8 RGB NHWC images of `input_size` square (the whole
  image, resized by the client without keeping the aspect, as the published
  'resize_crop' evaluation does) -> float32 class probabilities. The function
  does the rest of the evaluation preprocessing: the bicubic resize to the
  'resize_crop_<pct>' size (skipped when `input_size` is that size), the centre
  crop and the normalisation.

The batch dimension is free in both unless the exporter fixes it (`input_spec`).
Pure JAX, so every export format starts here.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.data import preproc_spec
from nfnets_jax.models.folding import FoldedModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The embedded evaluation preprocessing: `input_size` uint8 -> `image_size` normalised
  with `normalization`'s statistics (`preproc_spec.NORMALIZATIONS`)."""
  image_size: int
  eval_preproc: str
  input_size: Optional[int] = None  # None: the resize_crop size (no resize inside).
  normalization: str = preproc_spec.DEFAULT_NORMALIZATION

  def __post_init__(self):
    method, _ = preproc_spec.parse_eval_preproc(self.eval_preproc)
    if method != "resize_crop":
      raise ValueError(f"Embedded preprocessing implements 'resize_crop_<pct>' (the published "
                       f"evaluation), not {self.eval_preproc!r}.")
    if self.input_size is not None:
      preproc_spec.image_size_hw(self.input_size)
    preproc_spec.normalization_stats(self.normalization)

  @property
  def resized_size(self) -> int:
    """The side 'resize_crop_<pct>' resizes to before its centre crop."""
    _, pct = preproc_spec.parse_eval_preproc(self.eval_preproc)
    return preproc_spec.resize_crop_scaled_size((self.image_size, self.image_size), pct)[0]

  @property
  def served_size(self) -> int:
    """The side of the uint8 images the served function takes."""
    return self.resized_size if self.input_size is None else self.input_size

  def __call__(self, images: jax.Array) -> jax.Array:
    """uint8 [N, served_size, served_size, 3] -> normalised float32 [N, image_size, image_size, 3]."""
    x = images.astype(jnp.float32)
    size = self.resized_size
    if x.shape[1] != size:
      x = bicubic_resize(x, size)
    offset = (size - self.image_size + 1) // 2
    # lax slices, not indexing: with a symbolic batch, indexing lowers to a gather.
    x = jax.lax.slice_in_dim(x, offset, offset + self.image_size, axis=1)
    x = jax.lax.slice_in_dim(x, offset, offset + self.image_size, axis=2)
    mean, std = (np.asarray(v, np.float32)
                 for v in preproc_spec.normalization_stats(self.normalization))
    return (x - mean) / std


def bicubic_resize(x: jax.Array, size: int) -> jax.Array:
  """Bicubic resize of NHWC `x` to `size` square, half-pixel centres, no antialiasing:
  the sampling `tf.image.resize(..., 'bicubic')` of the evaluation pipeline does."""
  scale = jnp.asarray([size / x.shape[1], size / x.shape[2]], jnp.float32)
  return jax.image.scale_and_translate(x, (x.shape[0], size, size, x.shape[3]), (1, 2), scale,
                                       jnp.zeros(2, jnp.float32), method="cubic",
                                       antialias=False)


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity, as functions are (jax.jit).
class ServedModel:
  """What an export computes: `self(images)`, or `apply(params, images)` with `params`
  passed in (a SavedModel stores them as variables, once)."""
  folded: FoldedModel
  dtype: str = "float32"
  preprocessing: Optional[Preprocessing] = None

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}.")

  @property
  def params(self):
    return self.folded.params

  def apply(self, params, images: jax.Array) -> jax.Array:
    x = images if self.preprocessing is None else self.preprocessing(images)
    logits = self.folded.apply(params, x.astype(DTYPES[self.dtype]))
    return logits if self.preprocessing is None else jax.nn.softmax(logits, axis=-1)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.apply(self.params, images)


def served_function(folded: FoldedModel, dtype: str = "float32",
                    preprocessing: Optional[Preprocessing] = None) -> ServedModel:
  """`images -> logits` (or uint8 images -> probabilities with `preprocessing`), the
  network run in `dtype` ('float32', 'bfloat16' or 'float16'), its parameters closed over."""
  return ServedModel(folded, dtype, preprocessing)


def input_spec(image_side: int, preprocessing: Optional[Preprocessing],
               batch_size: Optional[int] = None) -> tuple[tuple, np.dtype]:
  """(shape, dtype) of what `served_function` takes; the batch is `batch_size`
  (None: free)."""
  if preprocessing is None:
    return (batch_size, image_side, image_side, 3), np.dtype(np.float32)
  side = preprocessing.served_size
  return (batch_size, side, side, 3), np.dtype(np.uint8)
