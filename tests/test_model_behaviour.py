"""Forward-pass contract of the model families, on small configurations."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models

NANO = "nfnet:nano"


@pytest.fixture(scope="module")
def nano():
  model = models.transform(NANO, num_classes=10)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)
  forward = jax.jit(model.apply, static_argnames=("is_training", "return_metrics"))
  return model, params, images, forward


def test_outputs_shapes_and_metrics(nano):
  _, params, images, forward = nano
  out = forward(params, None, images, is_training=False, return_metrics=True)
  num_blocks = len(models.model_plan(NANO, 10).blocks)
  assert out["logits"].shape == (4, 10) and out["pool"].shape == (4, 256)
  expected = {"logits", "pool"}
  expected |= {f"avg_sq_mean_{i}" for i in range(num_blocks + 1)}
  expected |= {f"avg_var_{i}" for i in range(num_blocks + 1)}
  expected |= {f"res_avg_var_{i}" for i in range(num_blocks)}
  assert set(out) == expected
  assert set(forward(params, None, images, is_training=False)) == {"logits", "pool"}


@pytest.mark.slow
def test_signal_propagation_at_init():
  """SkipInit: skip gains start at 0, so at init a block without a projection
  is exactly the identity and one with a projection outputs its shortcut; the
  signal stays near unit variance through the whole depth."""
  model = models.transform("nf_resnet:ResNet50", 10, width=1)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)
  out = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False, return_metrics=True))(
      params, images)
  plan = models.model_plan("nf_resnet:ResNet50", 10, width=1)
  for i, block in enumerate(plan.blocks):
    if not block.use_projection:
      assert out[f"avg_var_{i + 1}"] == out[f"avg_var_{i}"]
      assert out[f"avg_sq_mean_{i + 1}"] == out[f"avg_sq_mean_{i}"]
    assert 0.2 < float(out[f"avg_var_{i + 1}"]) < 5.0
    assert float(out[f"res_avg_var_{i}"]) > 0


def test_training_randomness_only_when_training_and_deterministic_per_key(nano):
  _, params, images, forward = nano
  k1, k2 = jax.random.key(7), jax.random.key(8)
  eval_out = forward(params, None, images, is_training=False)["logits"]
  np.testing.assert_array_equal(eval_out, forward(params, k1, images, is_training=False)["logits"])
  np.testing.assert_array_equal(eval_out, forward(params, k2, images, is_training=False)["logits"])
  train1 = forward(params, k1, images, is_training=True)["logits"]
  np.testing.assert_array_equal(train1, forward(params, k1, images, is_training=True)["logits"])
  assert not np.allclose(train1, forward(params, k2, images, is_training=True)["logits"])
  assert not np.allclose(train1, eval_out)


def test_without_dropout_and_stochastic_depth_training_equals_inference(nano):
  _, params, images, _ = nano
  model = models.transform(NANO, 10, drop_rate=0.0, stochdepth_rate=0.0)
  apply = jax.jit(model.apply, static_argnames="is_training")
  train = apply(params, jax.random.key(3), images, is_training=True)
  infer = apply(params, None, images, is_training=False)
  np.testing.assert_allclose(train["logits"], infer["logits"], rtol=1e-6, atol=1e-6)


def test_dropout_alone_changes_logits_but_not_pool(nano):
  _, params, images, _ = nano
  model = models.transform(NANO, 10, drop_rate=0.5, stochdepth_rate=0.0)
  apply = jax.jit(model.apply, static_argnames="is_training")
  train = apply(params, jax.random.key(3), images, is_training=True)
  infer = apply(params, None, images, is_training=False)
  np.testing.assert_allclose(train["pool"], infer["pool"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(train["logits"], infer["logits"])


def test_training_needs_an_rng(nano):
  model, params, images, _ = nano
  with pytest.raises(ValueError, match="PRNGKey"):
    jax.jit(lambda p, x: model.apply(p, None, x, is_training=True))(params, images)


@pytest.mark.parametrize("shape", [(32, 32, 3), (1, 2, 32, 32, 3)])
def test_non_4d_input_is_a_clear_error(nano, shape):
  model, params, _, _ = nano
  with pytest.raises(ValueError, match=r"4-D NHWC.*" + str(len(shape)) + "-D"):
    model.apply(params, None, jnp.zeros(shape), is_training=False)


def test_wrong_channel_count_is_a_clear_error(nano):
  model, params, _, _ = nano
  with pytest.raises(ValueError, match="3 input channels.*1 channels"):
    model.apply(params, None, jnp.zeros((2, 32, 32, 1)), is_training=False)


@pytest.mark.parametrize("name,variant", [
    ("nfnet", "F9"), ("nf_resnet", "ResNet51"), ("nf_regnet", "B9")])
def test_unknown_variant_lists_valid_ones(name, variant):
  model_class = models.FAMILIES[name].model_class
  with pytest.raises(ValueError, match=rf"'{variant}'.*valid variants: .*"):
    hk.transform(lambda: model_class(10, variant=variant)).init(None)


def test_unknown_model_name_lists_valid_ones():
  with pytest.raises(ValueError, match=r"'nfnet-F0'.*nfnet:F0"):
    models.transform("nfnet-F0")


@pytest.mark.parametrize("kwargs,match", [
    ({"activation": "relu7"}, "Unknown activation 'relu7'"),
    ({"activation": "glu"}, "'glu' changes or mixes the channel axis"),
    ({"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\), got 1.0"),
    ({"stochdepth_rate": -0.1}, "stochdepth_rate"),
    ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
  kwargs = {"num_classes": 10, **kwargs}
  with pytest.raises(ValueError, match=match):
    models.model_plan("nfnet:F0", **kwargs)


def test_nf_resnet_defaults_build_without_drop_rate():
  """The published NF-ResNet crashed with a KeyError when drop_rate was left at None."""
  for variant, row in models.FAMILIES["nf_resnet"].variants.items():
    plan = models.model_plan(f"nf_resnet:{variant}", 10)
    assert plan.drop_rate == row["drop_rate"] > 0


def test_nf_resnet_optional_squeeze_excite():
  shapes = models.param_shapes("nf_resnet:ResNet50", 10, width=1, use_se=True)
  se = shapes["NF_ResNet/~/nf_res_block/~/squeeze_excite/~/linear"]
  # width=1: the first block outputs 64 channels; se_ratio 0.25 -> 16 hidden units.
  assert se["w"].shape == (64, 16)
  plain = models.param_shapes("nf_resnet:ResNet50", 10, width=1)
  assert not any("squeeze_excite" in module for module in plain)


def test_regnet_accepts_published_swish_spelling():
  assert models.model_plan("nf_regnet:B0", 10, activation="swish").activation == "silu"


def test_count_flops_method_matches_plan(nano):
  flops = hk.transform(lambda: models.create_model(NANO, 10).count_flops(32, 32))
  per_layer, total = flops.apply({}, None)
  plan = models.model_plan(NANO, 10)
  # 4 stem convs, one entry per block, the final conv and the classifier.
  assert len(per_layer) == 4 + len(plan.blocks) + 2
  assert total == sum(per_layer) == plan.count_flops(32, 32)[1]
