"""timm's normalizer-free family as 'timm:<name>' models, and their conversion.

The structural tests need neither PyTorch nor timm: parameter counts against
timm's (recorded from timm 1.0.31; `benchmarks/timm_family_parity.py` measures
them again for every model), the layers timm's models differ by (ECA, timm's
weight standardisation, symmetric padding, stochastic depth scaled by 1/keep,
the `reg` layout) against their definitions. The agreement tests need timm
and skip without it: timm's model with every parameter randomised (gains and
biases too, so no branch is switched off), converted, must give the same
logits in inference mode within 1e-4 of the largest logit (measured about
1e-6), and the conversion back must give timm's arrays exactly.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import convert, models, weights
from nfnets_jax.weights import timm as timm_weights
from nfnets_jax.weights import timm_parity
from nfnets_jax.models import layers, network, timm_family

TOL = 1e-4

#: timm's parameter counts (sum of numel over `timm.create_model(name).parameters()`).
TIMM_PARAMS = {
    "test_nfnet": 383080, "eca_nfnet_l0": 24143924, "eca_nfnet_l2": 56722348,
    "nfnet_l0": 35074488, "nf_regnet_b0": 8764288, "nf_regnet_b5": 49741728,
    "nf_resnet50": 25557032, "nf_seresnet26": 17395976, "nf_ecaresnet101": 44549331,
    "nfnet_f0": 71489272, "dm_nfnet_f0": 71489284,
}


# ----------------------------------------------------------------------------- no timm needed


def test_every_timm_model_is_registered():
  names = models.list_models(published_only=True)
  assert {f"timm:{n}" for n in timm_family.CONFIGS} <= set(names)
  assert "timm:eca_nfnet_l3" in names and "timm:nf_ecaresnet101" in names


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_parameter_count_is_timms(name):
  assert models.count_params(f"timm:{name}") == TIMM_PARAMS[name]


def test_unknown_timm_name_lists_valid_ones():
  with pytest.raises(ValueError, match=r"'timm:eca_nfnet_l9'.*timm:eca_nfnet_l0"):
    models.transform("timm:eca_nfnet_l9")


def test_make_divisible_rounds_to_nearest_multiple_of_8_without_losing_a_tenth():
  assert timm_family.make_divisible(36) == 40      # 48 * 0.75: NF-RegNet-B0's stem
  assert timm_family.make_divisible(78) == 80
  assert timm_family.make_divisible(11) == 16      # 8 would lose more than 10%
  assert timm_family.make_divisible(3, round_limit=0.0) == 8


def test_eca_gate_is_a_1d_convolution_across_channels():
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 12))
  w = jnp.array([0.3, -1.2, 0.7])
  gate = layers.efficient_channel_attention({"w": w}, x)
  means = np.asarray(x).mean(axis=(1, 2))
  # np.convolve flips its kernel; ECA (a PyTorch Conv1d) correlates: flip it back.
  expected = [np.convolve(m, np.asarray(w)[::-1], mode="same") for m in means]
  np.testing.assert_allclose(np.asarray(gate)[:, 0, 0, :], 1 / (1 + np.exp(-np.array(expected))),
                             rtol=1e-6)


@pytest.mark.parametrize("channels,kernel", [(64, 3), (256, 5), (1536, 5), (2048, 7)])
def test_eca_kernel_grows_with_log_channels(channels, kernel):
  spec = models.BlockSpec(in_ch=channels, out_ch=channels, width=8, groups=1, stride=1, beta=1.0,
                          alpha=0.2, stochdepth_rate=0.0, se_position="output", attention="eca")
  assert spec.eca_kernel == kernel


def test_timm_standardisation_adds_eps_to_the_variance_and_scales_by_gamma():
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 2)) * 1e-3  # small: eps matters
  gain = jnp.array([1.5, 0.5])
  out = layers.standardize_weight(w, gain, 1e-5, eps_in_variance=True, scale=1.7)
  rows = np.asarray(w).reshape(-1, 2)
  expected = 1.7 * np.asarray(gain) * (rows - rows.mean(0)) / np.sqrt(36 * (rows.var(0) + 1e-5))
  np.testing.assert_allclose(np.asarray(out).reshape(-1, 2), expected, rtol=1e-5)


@pytest.mark.parametrize("size", [31, 32])
def test_symmetric_padding_shapes_and_max_pool(size):
  x = jax.random.normal(jax.random.key(2), (1, size, size, 3))
  pooled = layers.max_pool_3x3(x, "symmetric")
  assert pooled.shape[1] == (size - 1) // 2 + 1
  # PyTorch's MaxPool2d(3, 2, padding=1): the first window covers rows/cols 0..1.
  np.testing.assert_allclose(pooled[0, 0, 0], np.asarray(x)[0, :2, :2].max(axis=(0, 1)))
  conv = models.ConvSpec("c", 3, 8, 3, stride=2, padding="symmetric")
  assert conv.pads == ((1, 1), (1, 1)) and conv.output_hw(size, size)[0] == (size - 1) // 2 + 1
  assert models.ConvSpec("c", 3, 8, 7, stride=2, padding="symmetric").pads == ((3, 3), (3, 3))


def test_stochastic_depth_scales_kept_branches_by_one_over_keep():
  spec = models.model_plan("timm:test_nfnet", 10).blocks[1]
  assert spec.rescale_stochdepth and not spec.skip_gain
  params = _block_params(spec)
  x = jax.random.normal(jax.random.key(3), (64, 8, 8, spec.in_ch))

  def block(params, keep_prob, key):
    return np.asarray(network.block_forward(spec, jax.nn.silu, params, x, spec.beta, keep_prob,
                                            key)[0])

  # The shortcut alone: the branch's last conv switched off.
  off = {**params, "conv2": {**params["conv2"], "gain": jnp.zeros(spec.out_ch),
                             "bias": jnp.zeros(spec.out_ch)}}
  shortcut = block(off, 1.0, None)
  branch = block(params, 1.0, None) - shortcut
  keep = 0.75
  got = block(params, keep, jax.random.key(5)) - shortcut
  kept = np.abs(got).reshape(64, -1).max(axis=1) > 0
  assert 0 < kept.sum() < 64
  np.testing.assert_allclose(got[kept], branch[kept] / keep, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[~kept], 0.0)


def _block_params(spec) -> dict:
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  params = {c.name: {"w": normal(c.kernel, c.kernel, c.in_ch // c.groups, c.out_ch),
                     "gain": 1.0 + 0.1 * normal(c.out_ch), "bias": 0.1 * normal(c.out_ch)}
            for c in spec.convs}
  channels, hidden = spec.se_channels, spec.se_hidden
  params["squeeze_excite"] = {"linear": {"w": normal(channels, hidden), "b": normal(hidden)},
                              "linear_1": {"w": normal(hidden, channels), "b": normal(channels)}}
  return params


def test_regnet_layout_widens_from_input_and_gates_the_bottleneck():
  plan = models.model_plan("timm:nf_regnet_b0")
  first, second = plan.blocks[0], plan.blocks[1]
  assert plan.stem.out_ch == 40 and first.width == first.in_ch == 40      # ratio 1 at first
  assert second.width == timm_family.make_divisible(second.in_ch * 2.25)  # from the input
  assert all(b.se_position == "bottleneck" and b.se_channels == b.width for b in plan.blocks)
  light = models.model_plan("timm:eca_nfnet_l0").blocks[0]
  assert light.se_position == "output" and light.attention == "eca"
  assert light.width == light.out_ch // 4 and light.groups == light.width // 64


def test_timm_native_models_start_with_their_branches_off():
  """No SkipInit gain: the last conv's gain starts at zero, so each block is its shortcut."""
  net = models.transform("timm:test_nfnet", 10, conv_impl="xla")
  params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  last = {m: g["gain"] for m, g in params.items() if m.endswith("/~/conv2")}
  assert last and all(float(jnp.abs(g).max()) == 0.0 for g in last.values())
  assert not any("skip_gain" in g for g in params.values())
  assert all(float(jnp.min(g["gain"])) == 1.0 for m, g in params.items()
             if m.endswith("/~/conv0"))


def test_conversion_refuses_a_state_dict_that_does_not_fit_by_name():
  sd = timm_weights.to_timm(_random_params("timm:test_nfnet"), "timm:test_nfnet")
  sd.pop("stages.2.0.conv2.weight")
  sd["stages.0.0.conv1.bias"] = np.zeros(3, np.float32)
  with pytest.raises(models.ParameterMismatchError) as error:
    timm_weights.from_timm(sd, "timm:test_nfnet")
  assert "stages.2.0.conv2.weight (24, 8, 3, 3)" in str(error.value)
  assert "stages.0.0.conv1.bias: checkpoint (3,), model (8,)" in str(error.value)
  with pytest.raises(ValueError, match=r"not 'nf_regnet:B0'.*symmetric padding"):
    timm_weights.from_timm(sd, "nf_regnet:B0")


def test_conversion_round_trips_from_the_stacked_layout():
  params = _random_params("timm:test_nfnet")
  sd = timm_weights.to_timm(params, "timm:test_nfnet")
  assert sd["stem.conv1.weight"].shape == (16, 3, 3, 3) and "stages.0.0.attn_last.fc1.weight" in sd
  stacked = models.stacked_layout("timm:eca_nfnet_l1", 1000, block_loop="scan")
  assert not stacked.is_identity
  back = timm_weights.from_timm(sd, "timm:test_nfnet")
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  assert models.infer_model(params) == "timm:test_nfnet"
  assert timm_weights.to_timm(params, None).keys() == sd.keys()
  l1 = _random_params("timm:eca_nfnet_l1")
  from_stacked = timm_weights.to_timm(stacked.stack(l1), "timm:eca_nfnet_l1")
  from_published = timm_weights.to_timm(l1, "timm:eca_nfnet_l1")
  assert sorted(from_stacked) == sorted(from_published)
  np.testing.assert_array_equal(from_stacked["stages.2.5.conv2.weight"],
                                from_published["stages.2.5.conv2.weight"])


@pytest.mark.parametrize("name", ["nf_ecaresnet26", pytest.param("test_nfnet", marks=pytest.mark.slow)])
def test_folded_network_equals_the_training_form(name):
  """The inference form classify and export run: gamma in the kernels, no SkipInit gain,
  ECA gates, symmetric padding and max-pooling all fold."""
  params = _random_params(f"timm:{name}")
  params = {m: {n: (np.abs(v) if n == "gain" else 0.1 * v) for n, v in g.items()}
            for m, g in params.items()}
  images = np.random.default_rng(2).standard_normal((2, 33, 33, 3)).astype(np.float32)
  net = models.transform(f"timm:{name}", 1000, conv_impl="xla")
  apply = jax.jit(lambda p, x: net.apply(p, None, x, is_training=False)["logits"])
  expected = np.asarray(apply(params, images))
  folded = models.fold_for_inference(f"timm:{name}", params, conv_impl="xla")
  logits = np.asarray(folded(images))
  assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-5


def test_cli_converts_timm_models_both_ways(tmp_path, capsys):
  params = _random_params("timm:test_nfnet", 10)
  ours = weights.save_params_npz(params, tmp_path / "ours.npz")
  exported = tmp_path / "test_nfnet.safetensors"
  assert convert.main(["convert", f"--to_timm={ours}", f"--out={exported}"]) == 0
  assert "model timm:test_nfnet" in capsys.readouterr().out
  assert timm_weights.load_timm_state_dict(exported)["head.fc.weight"].shape == (10, 192)
  back = tmp_path / "back.npz"
  # A timm-native state dict is named, not guessed (nfnet_l0 has dm_nfnet_f0's shape).
  assert convert.main(["convert", f"--from_timm={exported}", f"--out={back}"]) == 1
  assert "--model=timm:eca_nfnet_l0" in capsys.readouterr().err
  assert convert.main(["convert", f"--from_timm={exported}", "--model=timm:test_nfnet",
                       f"--out={back}"]) == 0
  loaded = weights.load_params(back, model="timm:test_nfnet", num_classes=10)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def _experiment(name: str):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      f"experiment_{name}", pathlib.Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_light_nfnet_experiment_and_fine_tuning_configs():
  config = _experiment("nfnet_l").get_config("eca_nfnet_l1")
  assert config.model == "timm:eca_nfnet_l1"
  assert (config.dataset.image_size, config.dataset.eval_image_size) == (256, 320)
  assert config.dataset.augment_name == "cutmix_mixup_randaugment_410"
  with pytest.raises(ValueError, match=r"'eca_nfnet_l9'.*valid: nfnet_l0, eca_nfnet_l0"):
    _experiment("nfnet_l").get_config("eca_nfnet_l9")
  finetune = _experiment("finetune")
  assert finetune.get_config("timm:eca_nfnet_l0").init_from == "timm:eca_nfnet_l0"
  assert finetune.get_config("timm:eca_nfnet_l3").init_from is None  # timm publishes none
  assert finetune.get_config("timm:test_nfnet").dataset.image_size == 160


def _random_params(name: str, num_classes: int = 1000) -> dict:
  shapes = models.param_shapes(name, num_classes)
  rng = np.random.default_rng(0)
  return {m: {n: rng.standard_normal(leaf.shape).astype(np.float32) for n, leaf in g.items()}
          for m, g in shapes.items()}


# ----------------------------------------------------------------------------- against timm


def _check_agreement(name: str, size: int):
  pytest.importorskip("torch", reason="the timm agreement tests need PyTorch (peers extra)")
  timm = pytest.importorskip("timm", reason="the timm agreement tests need timm (peers extra)")
  model = timm_parity.randomise(timm.create_model(name).eval(), seed=0)
  images = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
  parity = timm_parity.compare(model, name, images)
  assert parity.error < TOL, (name, parity.error)
  assert not parity.mismatched, parity.mismatched[:5]


@pytest.mark.parametrize("name,size", [
    ("test_nfnet", 33), ("nf_ecaresnet26", 32),
    pytest.param("nf_regnet_b0", 32, marks=pytest.mark.slow)])
def test_logits_equal_timms(name, size):
  _check_agreement(name, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eca_nfnet_l0", "nfnet_f0", "dm_nfnet_f0", "nf_seresnet26"])
def test_logits_equal_timms_larger(name):
  _check_agreement(name, 64)


def test_parameter_counts_are_timms_live():
  torch = pytest.importorskip("torch", reason="needs PyTorch (peers extra)")
  timm = pytest.importorskip("timm", reason="needs timm (peers extra)")
  for name in ("eca_nfnet_l1", "nf_regnet_b3", "nf_seresnet101"):
    with torch.device("meta"):
      model = timm.create_model(name)
    assert models.count_params(f"timm:{name}") == sum(p.numel() for p in model.parameters())
