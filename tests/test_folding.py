"""models.fold_for_inference: the folded network computes the training form's logits.

Parameters are random values of the right shapes (no initialiser is compiled),
with gains and skip gains far from their initial 1 and 0, so every folded
constant matters. Tolerance: float32 round-off, 1e-5 of the largest logit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models, weights

NUM_CLASSES = 10


def random_params(name, **kwargs):
  """Standard-normal parameters of `name` in the published tree."""
  rng = np.random.default_rng(0)
  shapes = models.param_shapes(name, NUM_CLASSES, **kwargs)
  return jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, np.float32)), shapes)


def unfolded_logits(name, params, images, **kwargs):
  model = models.transform(name, NUM_CLASSES, conv_impl="xla", **kwargs)
  return jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])(params, images)


def assert_logits_close(got, want):
  want = np.asarray(want)
  assert np.abs(want).max() > 1e-3  # A network whose logits all vanish would prove nothing.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_folded_nano_matches_the_training_form():
  images = jax.random.normal(jax.random.key(1), (2, 24, 24, 3))
  params = random_params("nfnet:nano")
  folded = models.fold_for_inference("nfnet:nano", params, conv_impl="xla")
  assert_logits_close(jax.jit(folded.apply)(folded.params, images),
                      unfolded_logits("nfnet:nano", params, images))
  # A plain conv net: no gains, no standardisation left to do per call.
  names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(folded.params)[0]}
  assert names == {"w", "b", "scale"}  # scale: the gated blocks' alpha * skip_gain * 2


@pytest.mark.slow
def test_folded_stacked_layout_matches_the_training_form():
  """NF-ResNet (strided-conv shortcuts, max-pooled stem, no SE) from the stacked
  layout `models.transform(..., block_loop='scan').init` gives, run as scans."""
  kwargs = {"width": 1, "block_loop": "scan"}
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = random_params("nf_resnet:ResNet50", **kwargs)
  stacked = models.stacked_layout("nf_resnet:ResNet50", NUM_CLASSES, **kwargs).stack(params)
  folded = models.fold_for_inference("nf_resnet:ResNet50", stacked, conv_impl="xla",
                                     **kwargs)
  assert_logits_close(jax.jit(folded.apply)(folded.params, images),
                      unfolded_logits("nf_resnet:ResNet50", params, images, **kwargs))


def test_parameters_of_another_model_are_refused():
  params = random_params("nfnet:nano")
  with pytest.raises(weights.ParameterMismatchError):
    models.fold_for_inference("nfnet:F0", params)
  with pytest.raises(ValueError, match="BatchNorm"):
    models.fold_for_inference("bn_resnet:ResNet50", params)
