"""`python -m nfnets_jax.classify`: real photos, odd image modes and broken files.

The network is a randomly initialised `nfnet:nano` with 1000 classes, so the
classes it picks mean nothing; what is checked is the output's structure, the
ImageNet labels, and that every input is either classified or reported.
"""

import functools
import json
import pathlib
import re

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from nfnets_jax import classify, models, weights

PHOTOS = pathlib.Path(sklearn.datasets.__file__).parent / "images"
LINE = re.compile(r"^  (\d)  (\d\.\d{4})  (.+)$")


@pytest.fixture(scope="module")
def nano_npz(tmp_path_factory):
  """Random nano weights with `num_classes` (<= 1000) outputs, in the safe .npz format."""
  root = tmp_path_factory.mktemp("classify_ckpt")
  # Drawn with NumPy from the model's own parameter shapes (traced, never
  # compiled): a random network without paying for compiling its init.
  rng = np.random.default_rng(0)
  params = {}
  for module, group in models.param_shapes("nfnet:nano", 1000).items():
    params[module] = {}
    for name, leaf in group.items():
      if name == "w":
        value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
      elif name in ("gain", "skip_gain"):
        value = np.full(leaf.shape, 1.0 if name == "gain" else 0.5)
      else:
        value = rng.normal(scale=0.1, size=leaf.shape)
      params[module][name] = value.astype(np.float32)

  @functools.cache
  def make(num_classes: int) -> str:
    # Fewer classes: the first columns of the same classifier.
    head = params["NFNet/~/linear"]
    fewer = {**params, "NFNet/~/linear": {"w": head["w"][:, :num_classes],
                                          "b": head["b"][:num_classes]}}
    return str(weights.save_params_npz(fewer, root / f"nano_{num_classes}.npz"))

  return make


def test_predictions_are_the_training_form_networks(nano_npz):
  """classify runs the folded network: its probabilities are the unfolded network's."""
  import jax

  loaded = weights.load_model(nano_npz(1000), model="nfnet:nano")
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  model = loaded.transform()
  logits = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])
  want = jax.nn.softmax(logits(loaded.params, x))
  np.testing.assert_allclose(classify.make_predict_fn(loaded)(x), np.asarray(want), atol=1e-6)
  assert np.asarray(want).max() > 2e-3  # Not the uniform 1/1000 of a silent network.


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """The two scikit-learn photos, a grayscale and an RGBA PNG, a missing and a corrupt file."""
  root = tmp_path_factory.mktemp("classify_images")
  china = Image.fromarray(np.asarray(Image.open(PHOTOS / "china.jpg")))  # without its ICC profile
  china.convert("L").resize((64, 48)).save(root / "gray.png")
  rgba = china.convert("RGBA").resize((48, 64))
  rgba.putalpha(Image.linear_gradient("L").resize((48, 64)))
  rgba.save(root / "rgba.png")
  truncated = root / "truncated.jpg"
  truncated.write_bytes((PHOTOS / "china.jpg").read_bytes()[:4000])
  return {"china": str(PHOTOS / "china.jpg"), "flower": str(PHOTOS / "flower.jpg"),
          "gray": str(root / "gray.png"), "rgba": str(root / "rgba.png"),
          "missing": str(root / "missing.jpg"), "corrupt": str(truncated)}


def run(capsys, *args) -> tuple[int, str, str]:
  # An empty cache dir leaves the test process's JAX configuration alone.
  code = classify.main(["classify", "--compilation_cache_dir=", *args])
  out, err = capsys.readouterr()
  return code, out, err


def parse_text(out: str) -> dict[str, list[tuple[float, str]]]:
  """{image: [(probability, label), ...]} from the text output."""
  results, current = {}, None
  for line in out.splitlines():
    match = LINE.match(line)
    if match:
      assert int(match[1]) == len(results[current]) + 1  # ranks 1..k in order
      results[current].append((float(match[2]), match[3]))
    else:
      assert line.endswith(":"), line
      current = line[:-1]
      results[current] = []
  return results


@pytest.mark.slow
def test_photos_and_odd_modes_classified_broken_files_reported(nano_npz, images, capsys):
  order = ["china", "missing", "flower", "gray", "corrupt", "rgba"]
  code, out, err = run(capsys, f"--checkpoint={nano_npz(1000)}", "--model=nfnet:nano",
                       *[images[name] for name in order])
  assert code == 1  # some images failed, the others were still classified
  results = parse_text(out)
  good = [images[name] for name in ("china", "flower", "gray", "rgba")]
  assert list(results) == good
  names = dict(classify.imagenet_classes())
  for image, predictions in results.items():
    assert len(predictions) == 5, image
    probabilities = [p for p, _ in predictions]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)
    for _, label in predictions:
      synset, name = label.split("  ", 1)
      assert re.fullmatch(r"n\d{8}", synset) and names[synset] == name
  assert f"error: {images['missing']}: no such file" in err
  assert f"error: {images['corrupt']}: cannot decode it" in err
  assert "2 of 6 images could not be classified" in err


@pytest.mark.slow
def test_json_output_and_exit_status(nano_npz, images, capsys):
  paths = [images["china"], images["flower"], images["rgba"]]
  code, out, err = run(capsys, f"--checkpoint={nano_npz(1000)}", "--json", "--top_k=3",
                       "--batch_size=2", *paths)
  assert code == 0, err
  doc = json.loads(out)
  assert doc["model"] == "nfnet:nano"  # inferred from the weights: no --model given
  assert doc["image_size"] == 32 and doc["eval_preproc"] == "resize_crop_32"
  assert [r["image"] for r in doc["results"]] == paths and doc["errors"] == []
  classes = classify.imagenet_classes()
  for result in doc["results"]:
    predictions = result["predictions"]
    assert len(predictions) == 3
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
    for p in predictions:
      assert (p["synset"], p["name"]) == classes[p["index"]]


@pytest.mark.slow
def test_other_class_counts_print_indices(nano_npz, images, capsys):
  code, out, err = run(capsys, f"--checkpoint={nano_npz(10)}", "--image_size=24",
                       images["flower"])
  assert code == 0, err
  (predictions,) = parse_text(out).values()
  assert len(predictions) == 5
  indices = [int(re.fullmatch(r"class (\d+)", label)[1]) for _, label in predictions]
  assert len(set(indices)) == 5 and all(0 <= i < 10 for i in indices)


def test_grayscale_and_rgba_become_rgb(images):
  """Gray replicates into equal channels; RGBA keeps its colour, alpha dropped."""
  from nfnets_jax.data import preprocess
  mean, std = np.array(preprocess.MEAN_RGB), np.array(preprocess.STDDEV_RGB)
  gray = classify.preprocess(classify.read_image(images["gray"]), 16, "resize_crop_32")
  pixels = gray * std + mean
  assert gray.shape == (16, 16, 3)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-3)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-3)
  rgba = classify.preprocess(classify.read_image(images["rgba"]), 16, "crop_resize")
  colour = rgba * std + mean
  assert rgba.shape == (16, 16, 3) and np.abs(colour[..., 0] - colour[..., 2]).max() > 5


def test_class_names_follow_tfds_label_order():
  from nfnets_jax.data import imagenet
  classes = classify.imagenet_classes()
  assert [synset for synset, _ in classes] == imagenet.tfds_synsets()
  assert len(classes) == 1000 and all(name.strip() == name and name for _, name in classes)
  assert classes[0] == ("n01440764", "tench")  # label 0 of every ImageNet checkpoint


@pytest.mark.parametrize("args,code,message", [
    (["--model=nfnet:F9", "x.jpg"], 2, "Unknown model 'nfnet:F9'"),
    (["--model=nfnet:nano"], 2, "Name at least one image file"),
    (["--top_k=0", "x.jpg"], 2, "--top_k must be >= 1"),
    (["--eval_preproc=centre", "x.jpg"], 2, "Unknown eval_preproc 'centre'"),
    (["--model=nfnet:F0", "x.jpg"], 1, "does not match"),
])
def test_bad_flags_are_clear_errors(nano_npz, capsys, args, code, message):
  got, out, err = run(capsys, f"--checkpoint={nano_npz(1000)}", *args)
  assert got == code, err
  assert message in err and not out
