"""timm's trained weights by name ('timm:test_nfnet') from a Hugging Face hub cache.

The test lays out a hub cache exactly as huggingface_hub does
(`models--timm--<name>.<tag>/{blobs/<sha256>, snapshots/<revision>/model.safetensors
-> ../../blobs/<sha256>, refs/main}`), from timm's own `test_nfnet` written
with `safetensors.torch`, as timm uploads its weights. A fresh interpreter
with `HF_HUB_OFFLINE=1` and no network then loads it by name: it must give
timm's logits, record timm's evaluation settings, convert once, refuse a file
whose names do not fit its model by name, say which file to put where when
a checkpoint is not cached, and never import PyTorch.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from nfnets_jax.weights import timm_hub, timm_parity

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 64
REVISION = "0123456789abcdef0123456789abcdef01234567"

LOADER = r"""
import json, sys
import numpy as np
from nfnets_jax import models, weights
from nfnets_jax.weights import download

out = {}
try:
  weights.pretrained("timm:eca_nfnet_l0")
except download.OfflineError as err:
  out["offline_error"] = str(err)
try:
  weights.load_params("timm:nfnet_l0")
except models.ParameterMismatchError as err:
  out["mismatch_error"] = str(err)

model, params = weights.pretrained("timm:test_nfnet", conv_impl="xla")
images = np.load(sys.argv[1])
out["logits"] = np.asarray(model.apply(params, None, images, is_training=False)["logits"]).tolist()
out["meta"] = weights.load_meta("timm:test_nfnet")
again = weights.load_params("timm:test_nfnet")
out["again_equal"] = all(
    np.array_equal(again[m][n], p) for m, g in weights.load_params("timm:test_nfnet").items()
    for n, p in g.items())
out["torch_imported"] = "torch" in sys.modules
print(json.dumps(out))
"""


def _hub_file(cache: pathlib.Path, repo_id: str, payload: bytes) -> pathlib.Path:
  """Writes `payload` as `repo_id`'s model.safetensors, laid out as huggingface_hub caches it."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  blob = repo / "blobs" / hashlib.sha256(payload).hexdigest()
  blob.parent.mkdir(parents=True)
  blob.write_bytes(payload)
  snapshot = repo / "snapshots" / REVISION
  snapshot.mkdir(parents=True)
  (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(REVISION)
  return snapshot / "model.safetensors"


@pytest.fixture(name="hub", scope="module")
def _hub(tmp_path_factory):
  """timm's own test_nfnet (random, trained-looking values), written with safetensors.torch as
  timm uploads it, in a hub cache laid out as huggingface_hub's; and the environment that
  reads that cache offline, with our converted copies in a fresh home."""
  torch = pytest.importorskip("torch", reason="building timm's own file needs PyTorch (peers)")
  timm = pytest.importorskip("timm", reason="building timm's own file needs timm (peers)")
  from safetensors.torch import save as save_torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  # Trained-looking: random gains and biases switch every branch on.
  model = timm_parity.randomise(timm.create_model("test_nfnet").eval(), seed=0)
  payload = save_torch(model.state_dict(), metadata={"format": "pt"})
  root = tmp_path_factory.mktemp("hub")
  cache = root / "hub"
  _hub_file(cache, "timm/test_nfnet.r160_in1k", payload)
  _hub_file(cache, "timm/nfnet_l0.ra2_in1k", payload)  # names that do not fit nfnet_l0
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
         "NFNETS_JAX_HOME": str(root / "ours"), "PYTHONPATH": str(REPO)}
  return types.SimpleNamespace(model=model, cache=cache, env=env, home=root / "ours")


@pytest.mark.slow
def test_trained_weights_load_by_name_from_the_hub_cache_without_torch(tmp_path, hub):
  import torch  # pylint: disable=import-outside-toplevel

  model, cache, env = hub.model, hub.cache, hub.env
  images = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "images.npy")],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])

  logits = np.asarray(out["logits"])
  assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4
  assert not out["torch_imported"]
  assert out["again_equal"]
  converted = list((hub.home / "timm").glob("*.npz"))
  assert [p.name for p in converted] == [f"test_nfnet.r160_in1k-{REVISION}.npz"]

  assert out["meta"]["model"] == "timm:test_nfnet"
  assert out["meta"]["eval"] == {"image_size": 160, "eval_preproc": "center_crop_0.95",
                                 "normalization": "inception"}
  assert out["meta"]["timm_eval"]["mean"] == [0.5, 0.5, 0.5]
  assert out["meta"]["timm_eval"]["interpolation"] == "bicubic"

  offline = out["offline_error"]
  repo = cache / "models--timm--eca_nfnet_l0.ra2_in1k"
  assert f"{repo}/snapshots/<revision>/model.safetensors" in offline
  assert "timm/eca_nfnet_l0.ra2_in1k" in offline and "refs/main" in offline
  assert "stages.0.0.attn_last.fc1.weight" in out["mismatch_error"]


CLASSIFY_TWICE = r"""
import contextlib, io, json, sys
from nfnets_jax import classify

for extra in ([], ["--normalization=imagenet"]):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = classify.main(["classify", "--checkpoint=timm:test_nfnet", "--top_k=1000", "--json",
                          "--compilation_cache_dir=", sys.argv[1]] + extra)
  assert code == 0, code
  print(out.getvalue().strip().splitlines()[-1])
"""


@pytest.mark.slow
def test_classify_preprocesses_timm_weights_as_timm_does(tmp_path, hub):
  """classify on `timm:test_nfnet` gives timm's own probabilities for an image read and
  transformed by timm (its pretrained config: 160 px, 'center' crop 0.95, bicubic, mean and
  std 0.5): the recorded crop and normalisation are applied. Normalising with ImageNet's
  statistics instead (the flag) is far off: the comparison can tell the two apart."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  y, x = np.mgrid[0:120, 0:180]  # upscaled to 168 px: PIL's and TF's bicubic agree there
  pixels = np.stack([x * 1.3, y * 2.0, (x + y) * 0.8 + 40 * np.sin(x / 9)], -1)
  Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp_path / "image.png")
  config = timm.data.resolve_data_config({}, model=hub.model)
  assert config["mean"] == (0.5, 0.5, 0.5) and config["crop_pct"] == 0.95
  transform = timm.data.create_transform(**config)
  with torch.no_grad():
    logits = hub.model(transform(Image.open(tmp_path / "image.png").convert("RGB"))[None])
  expected = torch.log_softmax(logits, -1).numpy()[0]

  done = subprocess.run([sys.executable, "-c", CLASSIFY_TWICE, str(tmp_path / "image.png")],
                        capture_output=True, text=True, env=hub.env, cwd=tmp_path, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  recorded, imagenet = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
  assert (recorded["normalization"], recorded["eval_preproc"], recorded["image_size"]) == (
      "inception", "center_crop_0.95", 160)
  assert recorded["settings_from"]["normalization"] == "checkpoint"

  def error(result):  # log-probabilities, relative to their spread
    ours = np.zeros(1000)
    for p in result["results"][0]["predictions"]:
      ours[p["index"]] = np.log(p["probability"])
    return np.abs(ours - expected).max() / np.ptp(expected)

  assert error(recorded) < 1e-2  # PIL rounds the resized image to uint8, TF does not
  assert error(imagenet) > 0.2


@pytest.mark.slow
def test_timm_weights_fine_tune_on_digits_and_export_to_onnx(tmp_path, hub):
  """experiments/finetune.py:timm:test_nfnet from the hub cache: the run starts from timm's
  weights with their normalisation and crop, learns the digits, and its checkpoint exports to
  ONNX computing what JAX computes."""
  onnxruntime = pytest.importorskip("onnxruntime", reason="the ONNX check needs the export extra")
  workdir = tmp_path / "run"
  train = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.train", "--config=experiments/finetune.py:timm:test_nfnet",
       f"--workdir={workdir}", "--compilation_cache_dir=",
       "--config.dataset.name=digits", "--config.dataset.eval_split=test",
       "--config.dataset.image_size=32", "--config.dataset.eval_image_size=32",
       "--config.dataset.train_preproc=resize", "--config.dataset.autotune=False",
       "--config.dataset.deterministic=True", "--config.train_batch_size=64",
       "--config.eval_batch_size=120", "--config.num_train_steps=60", "--config.warmup_steps=5",
       "--config.optimizer.base_lr=0.4", "--config.checkpoint_every_steps=60",
       "--config.model_kwargs.conv_impl=xla"],
      capture_output=True, text=True, env=hub.env, cwd=REPO, timeout=900)
  assert train.returncode == 0, train.stderr[-3000:]
  result = json.loads(train.stdout.strip().splitlines()[-1])
  # 10 classes: chance is 0.1; two draws of the starting weights gave 0.94 and 0.95.
  assert result["step"] == 60 and result["top1"] > 0.6
  assert "init_from timm:test_nfnet: loaded 91 parameters" in train.stderr
  assert "normalised with" not in train.stderr  # no mismatch warning: the config follows timm

  from nfnets_jax import weights  # pylint: disable=import-outside-toplevel
  meta = weights.load_meta(workdir)
  assert meta["model"] == "timm:test_nfnet" and meta["num_classes"] == 10
  assert (meta["eval"]["normalization"], meta["eval"]["eval_preproc"]) == (
      "inception", "center_crop_0.95")

  onnx_file = tmp_path / "digits.onnx"
  export = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.export", f"--checkpoint={workdir}", "--format=onnx",
       f"--out={onnx_file}"],
      capture_output=True, text=True, env=hub.env, cwd=tmp_path, timeout=600)
  assert export.returncode == 0, export.stderr[-3000:]
  images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
  loaded = weights.load_model(workdir)
  expected = np.asarray(loaded.transform().apply(loaded.params, None, images,
                                                  is_training=False)["logits"])
  session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
  logits = session.run(None, {session.get_inputs()[0].name: images})[0]
  assert logits.shape == (3, 10)
  assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4


def test_unknown_or_untrained_names_list_the_trained_ones():
  with pytest.raises(timm_hub.download.UnknownVariantError, match=r"timm:eca_nfnet_l0.*timm:"):
    timm_hub.lookup("timm:eca_nfnet_l3")   # a timm model, but timm publishes no weights for it
  assert timm_hub.lookup("timm:eca_nfnet_l2").repo_id == "timm/eca_nfnet_l2.ra3_in1k"


def test_every_trained_weight_has_a_model_and_eval_settings():
  from nfnets_jax import models  # pylint: disable=import-outside-toplevel

  for name, entry in timm_hub.HUB_WEIGHTS.items():
    models.parse_model_name(f"timm:{name}")
    assert 0 < entry.settings.crop_pct <= 1 and entry.settings.image_size >= 160
  assert timm_hub.HUB_WEIGHTS["dm_nfnet_f0"].settings.eval_preproc == "resize_crop_0.9"
  assert timm_hub.meta("timm:eca_nfnet_l0")["eval"] == {
      "image_size": 288, "eval_preproc": "center_crop_1.0", "normalization": "imagenet"}
