"""Published weights by name: `weights.pretrained`, `weights.load_params('published:F0')`
and the tools' `--checkpoint=published:F0`.

The download runs against a real HTTP server on 127.0.0.1 (tests/test_weights.py's)
serving a published-format F0 file built here, with a table of its own checksum;
the pinned table is exercised through the cache and the offline path (no network
in tests).
"""

import hashlib
import json
import os
import subprocess
import sys
import zlib

import dill
import jax
import numpy as np
import pytest
from PIL import Image

from nfnets_jax import classify, models, weights
from nfnets_jax.weights import download
from nfnets_jax.weights import published
from reference_data import golden_outputs, param_trees, rebuild_params
from test_weights import Server


def _assert_identical(a, b):
  assert sorted(a) == sorted(b)
  for module in a:
    assert sorted(a[module]) == sorted(b[module]), module
    for name in a[module]:
      np.testing.assert_array_equal(np.asarray(a[module][name]), b[module][name])


@pytest.fixture(scope="module")
def published_f0():
  """(params, the bytes of a published-format file holding them): a dill pickle of
  {module: {name: array}}, as the published F0_haiku.npz is."""
  params = rebuild_params(param_trees()["nfnet:F0"])
  return params, dill.dumps(params)


@pytest.mark.slow
def test_pretrained_downloads_once_converts_and_reproduces_the_published_logits(
    published_f0, tmp_path):
  params, body = published_f0
  table = {"F0": download.PublishedFile("F0", "F0_haiku.npz", hashlib.md5(body).hexdigest(), 83.6)}
  with Server() as server:
    server.files["/F0_haiku.npz"] = body
    mirror = {"table": table, "base_url": server.url, "cache_dir": tmp_path, "progress": False}
    model, loaded = weights.pretrained("nfnet:F0", **mirror)
    assert server.requests["/F0_haiku.npz"] == 1
    _assert_identical(jax.device_get(loaded), params)
    converted = published.converted_path("F0", **mirror)
    assert converted == tmp_path / "F0_safe.npz" and converted.exists()

    golden = golden_outputs()
    logits = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])(
        loaded, golden["input"])
    expected = golden["nfnet:F0:logits"]
    error = np.max(np.abs(np.asarray(logits) - expected)) / np.max(np.abs(expected))
    assert error <= 1e-4, error

    # Later loads read the converted file: no request, and nothing is unpickled
    # (an audit hook, which cannot be removed, records only while `recording`).
    recording, unpickled = [True], []
    sys.addaudithook(lambda event, args: unpickled.append(args)
                     if recording[0] and event == "pickle.find_class" else None)
    try:
      weights.load_params(tmp_path / "F0_haiku.npz")  # the hook sees an unpickling
      assert unpickled, "the audit hook saw no unpickling of the pickle itself"
      unpickled.clear()
      again = published.load("F0", **mirror)
    finally:
      recording[0] = False
    assert server.requests["/F0_haiku.npz"] == 1
    assert not unpickled, unpickled
    _assert_identical(again, params)


def test_published_names_resolve_to_the_variant_and_its_network():
  assert published.variant_of("published:F3") == published.variant_of("nfnet:F3") == "F3"
  assert published.meta("F3") == {"model": "nfnet:F3", "num_classes": 1000, "model_kwargs": {}}
  assert weights.load_meta("published:F3") == published.meta("F3")
  for name in ("published:F7", "nfnet:F0+", "nf_resnet:ResNet50"):
    with pytest.raises(ValueError, match=r"No published weights for .*published: published:F0 "
                       r"\(nfnet:F0\), .*published:F6"):
      published.variant_of(name)
  with pytest.raises(ValueError, match="ema= and step="):
    weights.load_params("published:F0", ema=True)


def test_the_tools_name_the_url_and_the_path_when_offline(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(download.OFFLINE_ENV, "1")
  image = tmp_path / "photo.png"
  Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
  status = classify.main(["classify", "--checkpoint=published:F0", str(image)])
  err = capsys.readouterr().err
  assert status == 1
  assert f"{download.BASE_URL}/F0_haiku.npz" in err
  assert str(tmp_path / "cache" / "F0_haiku.npz") in err
  assert "Traceback" not in err


@pytest.mark.slow
def test_classify_takes_published_weights_by_name_from_the_cache(published_f0, tmp_path):
  """`--checkpoint=published:F0` with the converted file in $NFNETS_JAX_HOME, offline:
  the network is recognised from the name and no download is attempted."""
  params, _ = published_f0
  cache = tmp_path / "cache"
  weights.save_params_npz(params, cache / "F0_safe.npz")
  image = tmp_path / "photo.png"
  rng = np.random.default_rng(zlib.crc32(b"photo"))
  Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(image)
  env = {**os.environ, download.HOME_ENV: str(cache), download.OFFLINE_ENV: "1"}
  proc = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.classify", "--checkpoint=published:F0",
       "--image_size=64", "--top_k=3", "--json", str(image)],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["model"] == "nfnet:F0" and result["checkpoint"] == "published:F0", result
  assert len(result["results"][0]["predictions"]) == 3, result
