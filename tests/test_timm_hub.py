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

import numpy as np
import pytest

from nfnets_jax.weights import timm_hub

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


@pytest.mark.slow
def test_trained_weights_load_by_name_from_the_hub_cache_without_torch(tmp_path):
  torch = pytest.importorskip("torch", reason="building timm's own file needs PyTorch (peers)")
  timm = pytest.importorskip("timm", reason="building timm's own file needs timm (peers)")
  from safetensors.torch import save as save_torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  model = timm.create_model("test_nfnet").eval()
  with torch.no_grad():  # trained-looking: every branch switched on
    for key, p in model.named_parameters():
      if key.endswith(".gain"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape))
      elif key.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape))
  payload = save_torch(model.state_dict(), metadata={"format": "pt"})
  cache = tmp_path / "hub"
  _hub_file(cache, "timm/test_nfnet.r160_in1k", payload)
  _hub_file(cache, "timm/nfnet_l0.ra2_in1k", payload)  # names that do not fit nfnet_l0

  images = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
         "NFNETS_JAX_HOME": str(tmp_path / "ours"), "PYTHONPATH": str(REPO)}
  done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "images.npy")],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])

  logits = np.asarray(out["logits"])
  assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4
  assert not out["torch_imported"]
  assert out["again_equal"]
  converted = list((tmp_path / "ours" / "timm").glob("*.npz"))
  assert [p.name for p in converted] == [f"test_nfnet.r160_in1k-{REVISION}.npz"]

  assert out["meta"]["model"] == "timm:test_nfnet"
  assert out["meta"]["eval"] == {"image_size": 160, "eval_preproc": "center_crop_0.95"}
  assert out["meta"]["timm_eval"]["mean"] == [0.5, 0.5, 0.5]
  assert out["meta"]["timm_eval"]["interpolation"] == "bicubic"

  offline = out["offline_error"]
  repo = cache / "models--timm--eca_nfnet_l0.ra2_in1k"
  assert f"{repo}/snapshots/<revision>/model.safetensors" in offline
  assert "timm/eca_nfnet_l0.ra2_in1k" in offline and "refs/main" in offline
  assert "stages.0.0.attn_last.fc1.weight" in out["mismatch_error"]


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
  assert timm_hub.meta("timm:eca_nfnet_l0")["eval"] == {"image_size": 288,
                                                       "eval_preproc": "center_crop_1.0"}
