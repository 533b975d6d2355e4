"""Export a checkpoint for serving: StableHLO, TF SavedModel, TFLite or ONNX.

  python -m nfnets_jax.export --checkpoint=published:F0 --format=onnx --out=f0.onnx
  python -m nfnets_jax.export --checkpoint=/tmp/workdir --ema --format=savedmodel \\
      --out=/tmp/f0_saved --with_preprocessing

The exported network is the folded one (`models.fold_for_inference`): weight
standardisation, gains and activation gammas computed once into plain
kernels. The batch dimension is free (--batch_size fixes it: TFLite runs a
fixed-batch file much faster). Without --with_preprocessing the file
takes normalised float32 NHWC images of --image_size (default: the model's
test size) and returns the logits; with it, uint8 RGB images of --input_size
(default: image_size + 32 for the published 'resize_crop_32') and returns the
class probabilities (see `nfnets_jax.serving`, docs/export.md).

Formats:
  stablehlo   `jax.export` serialisation; reload with `jax.export.deserialize`.
  savedmodel  a TensorFlow SavedModel (`jax2tf`; signature `serving_default`).
  tflite      that SavedModel through TensorFlow's TFLite converter.
  onnx        the folded network's jaxpr translated op by op (`nfnets_jax.onnx_graph`,
              opset 18, NCHW convolutions), for ONNX Runtime; input 'images',
              output 'output'.
--dtype (alias of --compute_dtype) bfloat16/float16 is for stablehlo and savedmodel.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import tempfile
from typing import Any, Optional, Sequence

from nfnets_jax import cli, inference, serving

FORMATS = ("stablehlo", "savedmodel", "tflite", "onnx")
#: Formats that run the network in reduced precision inside the file.
REDUCED_PRECISION_FORMATS = ("stablehlo", "savedmodel")
INSTALL_HINT = "pip install 'nfnets-jax[export]'"
#: Platforms a StableHLO export is lowered for (one file serves each of them).
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
# What each format imports, as (module, pip package).
_NEEDS = {
    "stablehlo": (),
    "savedmodel": (("tensorflow", "tensorflow-cpu"),),
    "tflite": (("tensorflow", "tensorflow-cpu"),),
    "onnx": (("onnx", "onnx"),),
}


def check_format(fmt: str, dtype: str = "float32") -> None:
  """A ValueError unless `fmt` is a format that can hold a `dtype` network."""
  if fmt not in FORMATS:
    raise ValueError(f"Unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}.")
  if dtype != "float32" and fmt not in REDUCED_PRECISION_FORMATS:
    raise ValueError(f"--format={fmt} holds float32 networks only; --dtype={dtype} works with "
                     f"{' and '.join(REDUCED_PRECISION_FORMATS)}.")


def check_dependencies(fmt: str) -> None:
  """An ImportError naming what to install when `fmt`'s converters are missing."""
  for module, package in _NEEDS[fmt]:
    try:
      importlib.import_module(module)
    except ImportError:
      raise ImportError(f"--format={fmt} needs the {package} package, which is not installed: "
                        f"{INSTALL_HINT}") from None


def export(serve: serving.ServedModel, input_shape: Sequence[Optional[int]], input_dtype: Any,
           fmt: str, out: pathlib.Path) -> None:
  """Writes `serve` (one NHWC batch in, one array out) as `fmt` to `out`.

  `input_shape[0]` is the batch size, None for a free one.
  """
  check_format(fmt)
  check_dependencies(fmt)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if fmt == "stablehlo":
    out.write_bytes(stablehlo_bytes(serve, input_shape, input_dtype))
  elif fmt == "savedmodel":
    write_savedmodel(serve, input_shape, input_dtype, out)
  elif fmt == "tflite":
    out.write_bytes(tflite_bytes(serve, input_shape, input_dtype))
  else:
    write_onnx(serve, input_shape, input_dtype, out)


def stablehlo_bytes(serve, input_shape, input_dtype) -> bytes:
  """`jax.export` of `serve` for every `STABLEHLO_PLATFORMS`, serialised."""
  import jax

  batch = input_shape[0] if input_shape[0] is not None else jax.export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch, *input_shape[1:]), input_dtype)
  exported = jax.export.export(jax.jit(serve), platforms=STABLEHLO_PLATFORMS)(spec)
  return bytes(exported.serialize())


def write_savedmodel(serve: serving.ServedModel, input_shape, input_dtype, out: pathlib.Path,
                     platforms: Optional[Sequence[str]] = None) -> None:
  """A SavedModel whose `serving_default(images)` returns {'output': ...}.

  The parameters are TF variables passed to the converted program, so the file
  holds them once (closed over, they would be constants in each traced function).
  """
  import jax
  import numpy as np
  import tensorflow as tf
  from jax.experimental import jax2tf

  leaves, treedef = jax.tree_util.tree_flatten(serve.params)
  variables = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]
  # A None batch is symbolic in the program; a fixed one makes every shape static.
  poly = (None if input_shape[0] is not None
          else "(batch, " + ", ".join(str(d) for d in input_shape[1:]) + ")")
  converted = jax2tf.convert(serve.apply, polymorphic_shapes=[None, poly], with_gradient=False,
                             native_serialization_platforms=platforms)

  def call(images):
    return {"output": converted(jax.tree_util.tree_unflatten(treedef, variables), images)}

  module = tf.Module()
  module.weights = variables  # Tracked, so tf.saved_model.save writes them.
  module.serve = tf.function(
      call, autograph=False,
      input_signature=[tf.TensorSpec(list(input_shape), tf.as_dtype(input_dtype), name="images")])
  tf.saved_model.save(module, str(out), signatures=module.serve.get_concrete_function())


def tflite_bytes(serve, input_shape, input_dtype) -> bytes:
  """A CPU SavedModel of `serve` through TensorFlow's TFLite converter (builtin ops)."""
  with tempfile.TemporaryDirectory() as tmp:
    saved = pathlib.Path(tmp) / "saved"
    write_savedmodel(serve, input_shape, input_dtype, saved, ("cpu",))
    return savedmodel_to_tflite(saved)


def savedmodel_to_tflite(saved: pathlib.Path) -> bytes:
  """TFLite's converter lowers the SavedModel's XLA program to TFLite builtin ops."""
  import tensorflow as tf

  return tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()


def write_onnx(serve, input_shape, input_dtype, out: pathlib.Path) -> None:
  """ONNX from `serve`'s jaxpr (`onnx_graph`): no TensorFlow on the way, so the graph keeps
  plain NCHW convolutions that ONNX Runtime runs without layout shuffles."""
  from nfnets_jax import onnx_graph

  onnx_graph.save(onnx_graph.to_onnx(serve, input_shape, input_dtype), out)


# ----------------------------------------------------------------------------- CLI


def _define_flags():
  """A private flag set, so this tool can share a process with other CLIs."""
  from absl import flags

  fv = flags.FlagValues()
  inference.define_model_flags(fv)
  flags.DEFINE_alias("dtype", "compute_dtype", flag_values=fv)
  flags.DEFINE_enum("format", None, list(FORMATS), "Export format.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output file (a directory for savedmodel).", flag_values=fv)
  flags.DEFINE_bool(
      "with_preprocessing", False,
      "Embed the evaluation preprocessing: the file takes uint8 RGB images of --input_size and "
      "returns class probabilities.", flag_values=fv)
  flags.DEFINE_integer(
      "batch_size", None, "Fix the batch size in the file (default: free). Static shapes let "
      "TFLite fold the broadcasts that a free batch leaves as ops (much faster there).",
      lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
      "input_size", None, "With --with_preprocessing: the side of the uint8 input images. "
      "Default: the eval preprocessing's resize size (image_size + 32), so nothing is resized "
      "inside.", flag_values=fv)
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Exports the checkpoint the flags in `argv` name; returns the exit status."""
  fv = _define_flags()
  return cli.run_tool(argv, fv, __doc__ or "", lambda _: _export_from_flags(fv))


def _export_from_flags(fv) -> None:
  from nfnets_jax import models

  if not fv.format:
    raise cli.UsageError(f"--format is required: one of {', '.join(FORMATS)}.")
  if not fv.out:
    raise cli.UsageError("--out is required (a file; a directory for --format=savedmodel).")
  if fv.input_size is not None and not fv.with_preprocessing:
    raise cli.UsageError("--input_size applies only with --with_preprocessing.")
  with cli.usage_errors():
    check_format(fv.format, fv.compute_dtype)
  check_dependencies(fv.format)
  loaded = inference.load_model_from_flags(fv)
  settings = inference.eval_settings_from_flags(fv, loaded)
  image_size, eval_preproc = settings["image_size"], settings["eval_preproc"]
  preprocessing = None
  if fv.with_preprocessing:
    with cli.usage_errors():
      preprocessing = serving.Preprocessing(image_size, eval_preproc, fv.input_size)
  print(settings.describe(), file=sys.stderr, flush=True)
  kwargs = {k: v for k, v in loaded.model_kwargs.items() if k not in ("conv_impl", "block_loop")}
  # XLA's own convolutions and no loops: the plainest graph for other runtimes.
  folded = models.fold_for_inference(loaded.name, loaded.params, loaded.num_classes,
                                     conv_impl="xla", block_loop="unroll", **kwargs)
  serve = serving.served_function(folded, fv.compute_dtype, preprocessing)
  shape, dtype = serving.input_spec(image_size, preprocessing, fv.batch_size)
  export(serve, shape, dtype, fv.format, pathlib.Path(fv.out))
  output = "probabilities" if preprocessing else "logits"
  batch = fv.batch_size or "batch"
  print(f"Wrote {fv.out}: {fv.format}, {loaded.name} from {loaded.source}, input "
        f"[{batch}, {shape[1]}, {shape[2]}, 3] {dtype.name}, output [{batch}, {loaded.num_classes}] "
        f"{output}, computed in {fv.compute_dtype}.")
  if fv.format == "tflite" and fv.batch_size is None:
    print("Note: TFLite runs a file with a free batch several times slower than one with a "
          "fixed --batch_size (its shape ops and broadcasts stay in the graph); see "
          "docs/export.md.", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
