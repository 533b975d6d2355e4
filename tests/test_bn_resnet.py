"""The batch-normalised pre-activation ResNet baseline and its registry entry."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models
from nfnets_jax.models import bn_resnet

SMALL = {"width": 1}  # 64..512 channels: the ResNet50 graph at a sixteenth of the cost


@pytest.fixture(scope="module")
def small():
  """BN-ResNet50 (width 1) initialised, with a jitted apply and a Gaussian batch."""
  model = models.transform_with_state("bn_resnet:ResNet50", 10, **SMALL)
  images = jax.random.normal(jax.random.key(0), (8, 64, 64, 3))
  # RngBitGenerator keys compile the initialisers about twice as fast as threefry on CPU.
  params, state = jax.jit(model.init, static_argnames="is_training")(
      jax.random.key(1, impl="unsafe_rbg"), images[:1], is_training=False)
  # Always with metrics: one compilation per mode serves every test.
  apply = jax.jit(lambda p, s, x, is_training: model.apply(
      p, s, None, x, is_training=is_training, return_metrics=True), static_argnames="is_training")
  return params, state, apply, images


def test_registered_as_stateful_published_family():
  assert "bn_resnet:ResNet50" in models.list_models(published_only=True)
  assert models.is_stateful("bn_resnet:ResNet200")
  assert not models.is_stateful("nf_resnet:ResNet50")
  with pytest.raises(ValueError, match=r"'bn_resnet:ResNet50'.*transform_with_state"):
    models.transform("bn_resnet:ResNet50")


def test_same_convolutions_and_flops_as_nf_resnet():
  """BN and NF ResNets differ in normalisation only: every conv kernel has the
  same name and shape, so the FLOPs agree too."""
  bn = models.param_shapes("bn_resnet:ResNet101")
  nf = models.param_shapes("nf_resnet:ResNet101")

  def kernels(shapes, prefix):
    return {module.removeprefix(prefix).replace("nf_res_block", "block").replace(
        "bn_res_block", "block"): group["w"].shape
            for module, group in shapes.items() if "conv" in module.rsplit("/", 1)[-1]}

  assert kernels(bn, "BN_ResNet/") == kernels(nf, "NF_ResNet/")
  assert len(kernels(bn, "BN_ResNet/")) == 1 + 3 * 33 + 4
  for size in (224, 256):
    assert (models.count_flops("bn_resnet:ResNet101", size, size)
            == models.count_flops("nf_resnet:ResNet101", size, size))


def test_parameters_are_the_resnet_v2_ones():
  """Convolutions without bias, BN scale/offset before every conv and at the
  end; ResNet-50's widely quoted size is 25.6M parameters."""
  shapes = models.param_shapes("bn_resnet:ResNet50")
  plan = models.model_plan("bn_resnet:ResNet50")
  first = "BN_ResNet/~/bn_res_block/~/"
  assert set(shapes[first + "conv0"]) == {"w"}
  assert shapes[first + "bn0"]["scale"].shape[-1] == plan.blocks[0].in_ch == 64
  assert shapes[first + "bn1"]["offset"].shape[-1] == plan.blocks[0].width == 64
  assert shapes["BN_ResNet/~/final_bn"]["scale"].shape[-1] == 2048
  assert models.count_params("bn_resnet:ResNet50") / 1e6 == pytest.approx(25.6, rel=5e-3)


@pytest.mark.slow
def test_metric_outputs_and_state_updates_only_in_training(small):
  params, state, apply, images = small
  out, new_state = apply(params, state, images, is_training=True)
  blocks = len(models.model_plan("bn_resnet:ResNet50", **SMALL).blocks)
  expected = {"logits", "pool"} | {f"avg_sq_mean_{i}" for i in range(blocks + 1)}
  expected |= {f"avg_var_{i}" for i in range(blocks + 1)} | {f"res_avg_var_{i}" for i in range(blocks)}
  assert set(out) == expected
  assert out["logits"].shape == (8, 10) and out["pool"].shape == (8, 512)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state, new_state)
  assert any(jax.tree_util.tree_leaves(changed))
  _, eval_state = apply(params, state, images, is_training=False)
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), state, eval_state)
  assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.slow
def test_training_mode_normalises_with_batch_statistics(small):
  """With batch statistics the network cannot see the input's scale (the stem
  is linear and BN follows); with the running averages it can."""
  params, state, apply, images = small
  train = apply(params, state, images, is_training=True)[0]["pool"]
  train_scaled = apply(params, state, 10.0 * images, is_training=True)[0]["pool"]
  np.testing.assert_allclose(train_scaled, train, rtol=2e-3, atol=2e-3)
  infer = apply(params, state, images, is_training=False)[0]["pool"]
  infer_scaled = apply(params, state, 10.0 * images, is_training=False)[0]["pool"]
  assert not np.allclose(infer_scaled, infer, rtol=0.1)


@pytest.mark.slow
def test_signal_grows_linearly_within_stages_at_init(small):
  """He init behind BN -> ReLU: each residual branch has channel variance
  2 * Var(relu(z)) = 1 - 1/pi, and an identity-shortcut block adds it to the
  running variance (linear growth); projection blocks reset it."""
  params, state, apply, images = small
  out, _ = apply(params, state, images, is_training=True)
  plan = models.model_plan("bn_resnet:ResNet50", **SMALL)
  res = np.array([float(out[f"res_avg_var_{k}"]) for k in range(len(plan.blocks))])
  var = np.array([float(out[f"avg_var_{d}"]) for d in range(len(plan.blocks) + 1)])
  expected = 1 - 1 / np.pi
  assert np.mean(res) == pytest.approx(expected, rel=0.05)
  np.testing.assert_allclose(res, expected, rtol=0.2)
  for k, block in enumerate(plan.blocks):
    if block.use_projection:
      assert var[k + 1] < 2.0
    else:
      assert var[k + 1] - var[k] == pytest.approx(res[k], rel=0.15)


def test_init_in_inference_mode_creates_the_state():
  """hk.BatchNorm only creates its running statistics in training mode; the
  model initialises them whatever `is_training` says, like NF models init."""
  model = models.transform_with_state("bn_resnet:ResNet50", 10, **SMALL)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, is_training=False),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  _, state = shapes
  assert "BN_ResNet/~/final_bn/~/var_ema" in state


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "ResNet51"}, r"'ResNet51'.*valid variants: ResNet50, ResNet101"),
    ({"activation": "glu"}, "'glu' changes or mixes the channel axis"),
    ({"activation": "relu7"}, "Unknown activation 'relu7'"),
    ({"drop_rate": 1.5}, r"drop_rate must be a number in \[0, 1\), got 1.5"),
    ({"width": 0}, "width must be a positive number, got 0"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hk.transform_with_state(lambda: models.BNResNet(10, **kwargs)).init(None)


@pytest.mark.slow
def test_wrong_input_shape_is_a_clear_error(small):
  params, state, apply, _ = small
  with pytest.raises(ValueError, match=r"NHWC batch with 3 channels, got shape \(2, 32, 32, 1\)"):
    apply(params, state, jnp.zeros((2, 32, 32, 1)), is_training=True)


def test_activations_are_unscaled():
  """BN re-normalises before every activation, so the NF gamma constants do not apply."""
  x = jnp.linspace(-3.0, 3.0, 7)
  np.testing.assert_array_equal(bn_resnet.plain_activation("relu")(x), jax.nn.relu(x))
  np.testing.assert_array_equal(bn_resnet.plain_activation("swish")(x), jax.nn.silu(x))
  np.testing.assert_array_equal(bn_resnet.plain_activation("tanh")(x), jnp.tanh(x))
