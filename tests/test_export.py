"""nfnets_jax.export: each format, run in its own runtime, gives JAX's logits.

One random-parameter nfnet:nano (gains and skip gains far from their initial
values) is exported once per format; each file is run at two batch sizes and
compared with the training-form network's logits in JAX; NFNet-F0 (32 px) goes
through the four formats once more, and the other families through ONNX.
Tolerances, as a fraction of the largest logit (docs/export.md): StableHLO and
SavedModel run XLA on the same program, 1e-5; TFLite (XNNPACK kernels) and
ONNX Runtime run other kernels in float32, 1e-4.
"""

import importlib.util
import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import cli, export, models, weights
from nfnets_jax.export import command as export_command
from nfnets_jax.export import onnx_graph
from nfnets_jax.export import serving
from test_folding import random_params, unfolded_logits

NAME = "nfnet:nano"
SIZE = 32  # nano's test size, the export's default
NUM_CLASSES = 10
TOLERANCE = {"stablehlo": 1e-5, "savedmodel": 1e-5, "tflite": 1e-4, "onnx": 1e-4}
BATCHES = (1, 3)


def _missing(*modules):
  return [m for m in modules if importlib.util.find_spec(m) is None]


needs_tensorflow = pytest.mark.skipif(
    bool(_missing("tensorflow", "ai_edge_litert")),
    reason=f"the export extra is not installed ({export.INSTALL_HINT})")
needs_onnx = pytest.mark.skipif(
    bool(_missing("onnx", "onnxruntime")),
    reason=f"the export extra is not installed ({export.INSTALL_HINT})")
NEEDS = {"stablehlo": [], "savedmodel": [needs_tensorflow], "tflite": [needs_tensorflow],
         "onnx": [needs_onnx]}


@pytest.fixture(scope="module")
def nano():
  """(params, folded model, {batch: images}, {batch: JAX training-form logits}, that
  network's jitted apply(params, images))."""
  params = random_params(NAME)
  model = models.transform(NAME, NUM_CLASSES, conv_impl="xla")
  apply = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])
  rng = np.random.default_rng(1)
  images = {n: rng.standard_normal((n, SIZE, SIZE, 3), np.float32) for n in BATCHES}
  logits = {n: np.asarray(apply(params, x)) for n, x in images.items()}
  folded = models.fold_for_inference(NAME, params, conv_impl="xla", block_loop="unroll")
  return params, folded, images, logits, apply


@pytest.fixture(scope="module")
def exported(nano, tmp_path_factory):
  """format -> path of nano exported in it, each written once per module.

  The TFLite file is converted from the SavedModel with the function `export`
  chains for it (`savedmodel_to_tflite`), so the SavedModel is written once.
  """
  return _exporter(nano[1], SIZE, tmp_path_factory.mktemp("exported"))


def _exporter(folded, size, out):
  serve = serving.served_function(folded)
  shape, dtype = serving.input_spec(size, None)
  paths = {fmt: out / f"model_{fmt}" for fmt in export.FORMATS}

  def get(fmt):
    if not paths[fmt].exists():
      if fmt == "tflite":
        paths[fmt].write_bytes(export.savedmodel_to_tflite(get("savedmodel")))
      else:  # On CPU a SavedModel is lowered for the CPU, as the TFLite chain wants it.
        export.export(serve, shape, dtype, fmt, paths[fmt])
    return paths[fmt]

  return get


def run_stablehlo(path, x):
  return np.asarray(jax.export.deserialize(bytearray(path.read_bytes())).call(x))


def run_savedmodel(path, x):
  import tensorflow as tf
  loaded = tf.saved_model.load(str(path))
  return loaded.signatures["serving_default"](images=tf.constant(x))["output"].numpy()


def run_tflite(path, x):
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=str(path))
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  interpreter.resize_tensor_input(inp["index"], list(x.shape))
  interpreter.allocate_tensors()
  interpreter.set_tensor(inp["index"], x)
  interpreter.invoke()
  return interpreter.get_tensor(out["index"]).copy()


def run_onnx(path, x):
  import onnxruntime
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  return session.run(None, {session.get_inputs()[0].name: x})[0]


RUNTIMES = {"stablehlo": run_stablehlo, "savedmodel": run_savedmodel, "tflite": run_tflite,
            "onnx": run_onnx}


def assert_round_trip(fmt, path, images, logits):
  for n, x in images.items():
    got = RUNTIMES[fmt](path, x)
    want = logits[n]
    assert got.shape == want.shape and np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[fmt] * np.abs(want).max(),
                               err_msg=f"{fmt}, batch {n}")


@pytest.mark.parametrize("fmt", [
    "stablehlo",
    pytest.param("onnx", marks=NEEDS["onnx"]),
    # The TensorFlow conversions take seconds each (docs/testing.md: slow).
    pytest.param("savedmodel", marks=[needs_tensorflow, pytest.mark.slow]),
    pytest.param("tflite", marks=[needs_tensorflow, pytest.mark.slow]),
])
def test_each_format_round_trips_at_two_batch_sizes(fmt, nano, exported):
  _, _, images, logits, _ = nano
  assert_round_trip(fmt, exported(fmt), images, logits)


def trained_like_params(name):
  """Random parameters on the scale training leaves them: gains near 1, skip gains near
  0.3, small biases. (Standard-normal gains through F0's 12 blocks would grow the
  activations until float32 round-off, not the export, set the differences.)"""
  rng = np.random.default_rng(4)

  def draw(path, leaf):
    key = path[-1].key
    center, scale = {"gain": (1.0, 0.1), "skip_gain": (0.3, 0.1)}.get(key, (0.0, 1.0))
    if key in ("bias", "b"):
      scale = 0.1
    return jnp.asarray(center + scale * rng.standard_normal(leaf.shape, np.float32))

  return jax.tree_util.tree_map_with_path(draw, random_params(name))


@pytest.fixture(scope="module")
def f0(tmp_path_factory):
  """NFNet-F0 with random parameters at 32 px: ({batch: images}, {batch: JAX logits},
  format -> exported path), each format written once."""
  name, size = "nfnet:F0", 32
  params = trained_like_params(name)
  rng = np.random.default_rng(3)
  images = {n: rng.standard_normal((n, size, size, 3), np.float32) for n in BATCHES}
  logits = {n: np.asarray(unfolded_logits(name, params, x)) for n, x in images.items()}
  folded = models.fold_for_inference(name, params, conv_impl="xla", block_loop="unroll")
  return images, logits, _exporter(folded, size, tmp_path_factory.mktemp("f0"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [pytest.param(fmt, marks=NEEDS[fmt]) for fmt in export.FORMATS])
def test_f0_round_trips_in_each_format(fmt, f0):
  images, logits, exported_f0 = f0
  assert_round_trip(fmt, exported_f0(fmt), images, logits)


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf_resnet:ResNet50", "nf_regnet:B0"])
def test_the_other_families_round_trip_through_onnx(name, tmp_path):
  """The stem's max pool (ResNet) and depthwise convolutions with a bottleneck
  squeeze-excite (RegNet) as ONNX nodes."""
  params = trained_like_params(name)
  images = {n: np.random.default_rng(n).standard_normal((n, 48, 48, 3), np.float32)
            for n in BATCHES}
  logits = {n: np.asarray(unfolded_logits(name, params, x)) for n, x in images.items()}
  folded = models.fold_for_inference(name, params, conv_impl="xla", block_loop="unroll")
  path = tmp_path / "model.onnx"
  export.export(serving.served_function(folded), (None, 48, 48, 3), np.float32, "onnx", path)
  assert_round_trip("onnx", path, images, logits)


@needs_onnx
def test_onnx_graph_keeps_convolutions_in_onnx_layout(exported):
  """Convolution outputs stay NCHW through activations and sums: transposes only
  where an op needs the other layout (the input, each squeeze-excite gate)."""
  import onnx

  ops = [node.op_type for node in onnx.load(str(exported("onnx"))).graph.node]
  assert ops.count("Conv") >= 10
  assert ops.count("Transpose") < ops.count("Conv") / 2


@needs_onnx
def test_onnx_with_embedded_preprocessing_matches_jax(nano, nano_npz, tmp_path, capsys):
  """The CLI's uint8 -> probabilities ONNX file against the same served function in JAX
  (which the test above checks against the eval pipeline)."""
  out = tmp_path / "nano.onnx"
  code, stdout, _ = run_cli(capsys, f"--checkpoint={nano_npz}", f"--model={NAME}",
                            "--format=onnx", "--with_preprocessing", "--input_size=50",
                            f"--out={out}")
  assert code == cli.EXIT_OK and "[batch, 50, 50, 3] uint8" in stdout
  preprocessing = serving.Preprocessing(SIZE, "resize_crop_32", input_size=50)
  serve = jax.jit(serving.served_function(nano[1], "float32", preprocessing))
  for n in BATCHES:
    pixels = np.random.default_rng(n).integers(0, 256, (n, 50, 50, 3), dtype=np.uint8)
    got = run_onnx(out, pixels)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(serve(pixels)), atol=1e-5)


@needs_onnx
def test_large_weights_go_to_a_side_file(nano, exported, tmp_path):
  import onnx

  model = onnx.load(str(exported("onnx")))
  path = tmp_path / "nano.onnx"
  onnx_graph.save(model, path, external_data_bytes=0)
  assert (tmp_path / "nano.onnx.data").stat().st_size > path.stat().st_size
  _, _, images, logits, _ = nano
  assert_round_trip("onnx", path, images, logits)


@needs_onnx
def test_a_primitive_without_an_onnx_form_is_named():
  """In a fresh interpreter, so that the translator imports everything it uses itself."""
  script = ("import jax.numpy as jnp, numpy as np\n"
            "from nfnets_jax.export import onnx_graph\n"
            "try:\n"
            "  onnx_graph.to_onnx(lambda x: jnp.sort(x, axis=-1), (None, 8), np.float32)\n"
            "except onnx_graph.UnsupportedPrimitiveError as err:\n"
            "  print(err)\n")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("No ONNX translation for the JAX primitive 'sort' (giving "
                                "float32[batch,8]); the ONNX export covers abs, add,")


def test_embedded_preprocessing_matches_the_eval_pipeline(nano):
  """uint8 in, probabilities out: the project's TF eval preprocessing of the same pixels
  (a PNG through `classify.preprocess`), then the network, then a softmax. Input 50 px
  for 64 (resize_crop_32 of 32), so the bicubic resize runs."""
  from PIL import Image

  from nfnets_jax import classify

  params, folded, _, _, apply = nano
  preprocessing = serving.Preprocessing(SIZE, "resize_crop_32", input_size=50)
  shape, dtype = serving.input_spec(SIZE, preprocessing)
  assert shape == (None, 50, 50, 3) and dtype == np.uint8
  pixels = np.random.default_rng(2).integers(0, 256, (3, 50, 50, 3), dtype=np.uint8)
  blob = jax.export.export(jax.jit(serving.served_function(folded, "float32", preprocessing)))(
      jax.ShapeDtypeStruct((*jax.export.symbolic_shape("b"), *shape[1:]), dtype)).serialize()
  got = np.asarray(jax.export.deserialize(blob).call(pixels))

  def png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()

  inputs = np.stack([classify.preprocess(png(p), SIZE, "resize_crop_32") for p in pixels])
  want = jax.nn.softmax(apply(params, inputs))
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


def test_bfloat16_stablehlo_export_runs_in_bfloat16(nano):
  _, folded, images, logits, _ = nano
  serve = serving.served_function(folded, "bfloat16")
  exported = jax.export.export(jax.jit(serve))(
      jax.ShapeDtypeStruct((*jax.export.symbolic_shape("b"), SIZE, SIZE, 3), jnp.float32))
  assert "bf16" in exported.mlir_module()
  got = np.asarray(exported.call(images[3]))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, logits[3], atol=0.05 * np.abs(logits[3]).max())


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def nano_npz(nano, tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "nano.npz"
  weights.save_params_npz(nano[0], path)
  return str(path)


def run_cli(capsys, *args):
  code = export_command.main(["export", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_cli_writes_a_stablehlo_file_with_the_checkpoints_logits(nano, nano_npz, tmp_path, capsys):
  out = tmp_path / "nano.stablehlo"
  code, stdout, _ = run_cli(capsys, f"--checkpoint={nano_npz}", f"--model={NAME}",
                            "--format=stablehlo", f"--out={out}")
  assert code == cli.EXIT_OK and "[batch, 32, 32, 3] float32" in stdout
  _, _, images, logits, _ = nano
  np.testing.assert_allclose(run_stablehlo(out, images[1]), logits[1],
                             atol=1e-5 * np.abs(logits[1]).max())


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_onnx),
                                 pytest.param("tflite", marks=[needs_tensorflow,
                                                               pytest.mark.slow])])
def test_a_fixed_batch_size_is_static_in_the_file(fmt, nano, nano_npz, tmp_path, capsys):
  """--batch_size=3: the file's input is [3, 32, 32, 3] (TFLite then folds the broadcasts a
  free batch leaves as ops), and it still gives JAX's logits."""
  out = tmp_path / f"nano_{fmt}"
  code, stdout, _ = run_cli(capsys, f"--checkpoint={nano_npz}", f"--model={NAME}",
                            f"--format={fmt}", "--batch_size=3", f"--out={out}")
  assert code == cli.EXIT_OK and "input [3, 32, 32, 3] float32" in stdout
  if fmt == "onnx":
    import onnxruntime
    shape = onnxruntime.InferenceSession(str(out)).get_inputs()[0].shape
  else:
    from ai_edge_litert.interpreter import Interpreter
    shape = list(Interpreter(model_path=str(out)).get_input_details()[0]["shape_signature"])
  assert shape == [3, SIZE, SIZE, 3]
  _, _, images, logits, _ = nano
  assert_round_trip(fmt, out, {3: images[3]}, logits)


@pytest.mark.parametrize("args, code, message", [
    (["--format=pdf"], cli.EXIT_USAGE, "--format=pdf: value should be one of <stablehlo|savedmodel|tflite|onnx>"),
    (["--format=onnx", "--dtype=bfloat16"], cli.EXIT_USAGE, "--dtype=bfloat16 works with"),
    (["--format=stablehlo", "--model=nfnet:F0"], cli.EXIT_FAILURE, "nfnet:F0"),
    (["--format=stablehlo", "--eval_preproc=crop_resize", "--with_preprocessing"],
     cli.EXIT_USAGE, "'resize_crop_<pct>'"),
])
def test_bad_requests_are_one_line_errors(nano_npz, tmp_path, capsys, args, code, message):
  got, _, err = run_cli(capsys, f"--checkpoint={nano_npz}", f"--out={tmp_path / 'x'}", *args)
  assert got == code and message in err
  assert err.startswith("usage error: " if code == cli.EXIT_USAGE else "error: ")
  assert not (tmp_path / "x").exists()


def test_a_missing_converter_names_what_to_install(nano_npz, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)  # What `import onnx` meets when absent.
  code, _, err = run_cli(capsys, f"--checkpoint={nano_npz}", "--format=onnx",
                         f"--out={tmp_path / 'x.onnx'}")
  assert code == cli.EXIT_FAILURE
  assert err.strip() == ("error: --format=onnx needs the onnx package, which is not "
                         f"installed: {export.INSTALL_HINT}")
  assert not (tmp_path / "x.onnx").exists()
