"""timm <-> nfnets-jax weight conversion.

The layout tests run on NumPy alone. The agreement tests need PyTorch and timm
(optional peers) and skip without them. They compare logits on a real
photograph (scikit-learn's bundled `china.jpg`), preprocessed once and fed
to both frameworks, with two tolerances:

* timm as shipped evaluates GELU exactly (erf); ours, like the published
  code, uses the tanh approximation. The two differ by at most 4.7e-4 per
  element (8e-4 after gamma = 1.70), so logits can differ by about that much
  relative to their scale: bound 1e-3 normwise; measured 1.2e-4 to 1.4e-4.
* With timm switched to its own tanh GELU (`timm.layers.activations.gelu_tanh`,
  set on the model's GammaAct layers), the two networks compute the same
  function, and the remaining difference is float32 summation order over ~40
  layers: bound 1e-5 normwise; measured 1.4e-6 to 1.6e-6. Without folding timm's
  weight-standardisation eps (1e-5, added to the variance) into the gains the
  error would be 1.4e-2 to 1.7e-2 with He-initialised weights; the test checks
  that too, so the fold cannot silently go missing.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from nfnets_jax import convert, models, weights
from nfnets_jax.weights import timm as timm_weights
from reference_data import rebuild_params

REPO = pathlib.Path(__file__).resolve().parent.parent
IMAGE_SIZE = 128
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MATCHED_GELU_TOL = 1e-5
SHIPPED_GELU_TOL = 1e-3

def _reference_params(name: str, num_classes: int = 1000) -> dict:
  shapes = models.param_shapes(name, num_classes)
  return rebuild_params({m: {n: list(leaf.shape) for n, leaf in g.items()}
                         for m, g in shapes.items()})


def _normwise(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- NumPy only


def test_round_trip_through_timm_layout():
  params = _reference_params("nfnet:nano", 10)
  sd = timm_weights.to_timm(params, "nfnet:nano")
  assert sd["head.fc.weight"].shape == (10, params["NFNet/~/linear"]["w"].shape[0])
  w = params["NFNet/~/nf_block/~/conv1"]["w"]
  assert sd["stages.0.0.conv2.weight"].shape == (w.shape[3], w.shape[2], w.shape[0], w.shape[1])
  back = timm_weights.from_timm(sd, "nfnet:nano")
  assert sorted(back) == sorted(params)
  for module, group in params.items():
    assert sorted(back[module]) == sorted(group)
    for name, value in group.items():
      assert back[module][name].dtype == value.dtype
      if name == "gain":  # Rescaled through float64 and back: float32 rounding only.
        np.testing.assert_allclose(back[module][name], value, rtol=2e-7, atol=0)
      else:
        np.testing.assert_array_equal(back[module][name], value)


def test_gain_fold_is_the_ratio_of_the_two_standardisations():
  """Standardising with timm's formula and the timm gain gives our kernel."""
  params = _reference_params("nfnet:nano")
  # He-scale weights, where timm's eps matters (about 1% at fan_in 1152).
  w = params["NFNet/~/nf_block/~/conv1"]["w"] / np.sqrt(3 * 3 * 16)
  params["NFNet/~/nf_block/~/conv1"]["w"] = w
  sd = timm_weights.to_timm(params, "nfnet:nano")
  tw = sd["stages.0.0.conv2.weight"].astype(np.float64)
  flat = tw.reshape(tw.shape[0], -1)
  timm_kernel = ((flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
                 * sd["stages.0.0.conv2.gain"].reshape(-1, 1) / np.sqrt(flat.shape[1]))
  ours = np.asarray(models.standardize_weight(w, params["NFNet/~/nf_block/~/conv1"]["gain"]))
  ours = ours.transpose(3, 2, 0, 1).reshape(tw.shape[0], -1)
  np.testing.assert_allclose(timm_kernel, ours, rtol=1e-5, atol=1e-7)


def test_mismatched_state_dict_lists_keys():
  sd = timm_weights.to_timm(_reference_params("nfnet:nano"), "nfnet:nano")
  gain_shape = sd.pop("stages.1.0.conv2b.gain").shape
  sd["stages.9.0.conv1.weight"] = np.zeros((2, 2, 1, 1), np.float32)
  final_shape = sd["final_conv.weight"].shape
  sd["final_conv.weight"] = np.zeros((7,) + final_shape[1:], np.float32)
  with pytest.raises(weights.ParameterMismatchError) as err:
    timm_weights.from_timm(sd, "nfnet:nano")
  message = str(err.value)
  assert f"stages.1.0.conv2b.gain {gain_shape}" in message
  assert "stages.9.0.conv1.weight (2, 2, 1, 1)" in message
  assert f"final_conv.weight: checkpoint {(7,) + final_shape[1:]}, model {final_shape}" in message


def test_other_families_are_refused_with_the_reason():
  with pytest.raises(ValueError, match="symmetric padding"):
    timm_weights.to_timm(_reference_params("nf_regnet:B0"), "nf_regnet:B0")


def test_model_inference():
  params = _reference_params("nfnet:nano")
  assert models.infer_model(params) == "nfnet:nano"
  assert timm_weights.infer_timm_model(timm_weights.to_timm(params, "nfnet:nano")) == "nfnet:nano"
  with pytest.raises(ValueError, match="pass the model name"):
    timm_weights.infer_timm_model({"stages.0.0.conv3.weight": np.zeros((5, 1, 1, 1))})


def test_cli_timm_safetensors_both_ways(tmp_path, capsys):
  params = _reference_params("nfnet:nano")
  ours = weights.save_params_npz(params, tmp_path / "nano.npz")
  exported = tmp_path / "nano.safetensors"
  assert convert.main(["convert", f"--to_timm={ours}", f"--out={exported}"]) == 0
  assert "model nfnet:nano" in capsys.readouterr().out
  sd = timm_weights.load_timm_state_dict(exported)
  assert sd["stem.conv1.weight"].shape == (16, 3, 3, 3)

  back = tmp_path / "back.npz"
  assert convert.main(["convert", f"--from_timm={exported}", f"--out={back}"]) == 0
  loaded = weights.load_params(back, model="nfnet:nano")
  np.testing.assert_array_equal(loaded["NFNet/~/final_conv"]["w"],
                                params["NFNet/~/final_conv"]["w"])

  assert convert.main(["convert", f"--from_timm={exported}", f"--out={back}"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert convert.main(["convert", f"--to_timm={ours}", f"--out={tmp_path / 'x.npz'}"]) == 2
  assert "must end in .safetensors" in capsys.readouterr().err
  assert convert.main(["convert", f"--from_timm={exported}", f"--to_timm={ours}",
                       f"--out={tmp_path / 'y.npz'}"]) == 2
  assert "exactly one of" in capsys.readouterr().err
  assert convert.main(["convert", f"--from_timm={exported}", "--model=nfnet:F0",
                       f"--out={tmp_path / 'z.npz'}"]) == 1
  assert "stages.0.0.conv1.weight" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_help_runs_as_a_module():
  done = subprocess.run([sys.executable, "-m", "nfnets_jax.convert", "--help"],
                        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert done.returncode == 0, done.stderr
  assert "--from_pickle" in done.stdout and "--trust_pickle" in done.stdout


# ----------------------------------------------------------------------------- with timm


@pytest.fixture(scope="module")
def timm():
  pytest.importorskip("torch", reason="PyTorch is an optional peer (pip install torch).")
  return pytest.importorskip("timm", reason="timm is an optional peer (pip install timm).")


@pytest.fixture(scope="module")
def photo():
  """scikit-learn's bundled photograph, resized (bicubic) and centre-cropped, ImageNet-normalised."""
  from PIL import Image
  from sklearn.datasets import load_sample_image

  image = load_sample_image("china.jpg")
  h, w = image.shape[:2]
  scale = IMAGE_SIZE / min(h, w)
  resized = Image.fromarray(image).resize((round(w * scale), round(h * scale)),
                                          Image.Resampling.BICUBIC)
  x = np.asarray(resized, np.float32) / 255.0
  top, left = (x.shape[0] - IMAGE_SIZE) // 2, (x.shape[1] - IMAGE_SIZE) // 2
  x = x[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
  return ((x - IMAGENET_MEAN) / IMAGENET_STD)[None]


@pytest.fixture(scope="module")
def forward():
  """Our F0, compiled once for the whole module."""
  model = models.transform("nfnet:F0")
  return jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])


def _random_timm_f0(timm):
  """timm's dm_nfnet_f0 with its own (He) weight init, and random gains, biases and
  SkipInit gains: at init those are 1, 0 and 0, and zero SkipInit gains would switch
  every residual branch off, leaving most of the conversion untested."""
  import torch

  model = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith(".gain"):
        p.copy_(1 + 0.1 * noise)
      elif name.endswith("skipinit_gain"):
        p.copy_(0.5 + 0.1 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.1 * noise)
  return model


def _timm_logits(model, images, gelu: str):
  """Eval-mode logits; `gelu='tanh'` switches the gamma-scaled activations to timm's
  tanh-approximate GELU (what jax.nn.gelu computes), 'exact' is timm as shipped."""
  import torch
  from timm.layers import activations

  act = {"exact": activations.gelu, "tanh": activations.gelu_tanh}[gelu]
  for module in model.modules():
    if type(module).__name__ == "GammaAct":
      module.act_fn = act
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.slow
def test_from_timm_matches_timm_logits_on_a_photo(timm, photo, forward):
  model = _random_timm_f0(timm)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  assert timm_weights.infer_timm_model(sd) == "nfnet:F0"
  params = timm_weights.from_timm(sd, "nfnet:F0")
  ours = np.asarray(forward(params, photo))

  shipped = _timm_logits(model, photo, "exact")
  assert _normwise(ours, shipped) <= SHIPPED_GELU_TOL
  assert ours.argmax() == shipped.argmax()
  matched = _timm_logits(model, photo, "tanh")
  error = _normwise(ours, matched)
  assert error <= MATCHED_GELU_TOL

  unfolded = timm_weights.from_timm(sd, "nfnet:F0", timm_eps=0.0)
  assert _normwise(forward(unfolded, photo), matched) > 100 * max(error, 1e-7)


def test_pth_files_load_without_pickled_code(timm, tmp_path):
  """A training-style .pth (weights under 'state_dict', DDP 'module.' prefix) reads back."""
  import torch

  sd = timm_weights.to_timm(_reference_params("nfnet:nano"), "nfnet:nano")
  path = tmp_path / "nano.pth"
  torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()},
              "epoch": 3}, path)
  loaded = timm_weights.load_timm_state_dict(path)
  assert sorted(loaded) == sorted(sd)
  assert all(loaded[k].shape == sd[k].shape and np.array_equal(loaded[k], sd[k]) for k in sd)
  assert timm_weights.from_timm(loaded, None)["NFNet/~/linear"]["w"].shape == (
      sd["head.fc.weight"].shape[::-1])


@pytest.mark.slow
def test_to_timm_loads_strictly_and_matches_our_logits(timm, photo, forward):
  import torch

  params = _reference_params("nfnet:F0")
  # He-scale kernels, where timm's eps matters; ours is scale invariant there.
  for group in params.values():
    if "w" in group and group["w"].ndim == 4:
      group["w"] = group["w"] / np.sqrt(np.prod(group["w"].shape[:3], dtype=np.float32))
  ours = np.asarray(forward(params, photo))

  model = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
  sd = timm_weights.to_timm(params, "nfnet:F0")
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  assert _normwise(_timm_logits(model, photo, "tanh"), ours) <= MATCHED_GELU_TOL
