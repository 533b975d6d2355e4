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
class probabilities (see `nfnets_jax.export.serving`, docs/export.md).

Formats:
  stablehlo   `jax.export` serialisation; reload with `jax.export.deserialize`.
  savedmodel  a TensorFlow SavedModel (`jax2tf`; signature `serving_default`).
  tflite      that SavedModel through TensorFlow's TFLite converter.
  onnx        the folded network's jaxpr translated op by op (`nfnets_jax.export.onnx_graph`,
              opset 18, NCHW convolutions), for ONNX Runtime; input 'images',
              output 'output'.
--dtype (alias of --compute_dtype) bfloat16/float16 is for stablehlo and savedmodel.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Optional, Sequence

from nfnets_jax import cli
from nfnets_jax.cli import model_flags
from nfnets_jax.export import serving, writers

# ----------------------------------------------------------------------------- CLI


def _define_flags():
  """A private flag set, so this tool can share a process with other CLIs."""
  from absl import flags

  fv = flags.FlagValues()
  model_flags.define_model_flags(fv)
  flags.DEFINE_alias("dtype", "compute_dtype", flag_values=fv)
  flags.DEFINE_enum("format", None, list(writers.FORMATS), "Export format.", flag_values=fv)
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
  if not fv.format:
    raise cli.UsageError(f"--format is required: one of {', '.join(writers.FORMATS)}.")
  if not fv.out:
    raise cli.UsageError("--out is required (a file; a directory for --format=savedmodel).")
  if fv.input_size is not None and not fv.with_preprocessing:
    raise cli.UsageError("--input_size applies only with --with_preprocessing.")
  with cli.usage_errors():
    writers.check_export_format(fv.format, fv.compute_dtype)
  writers.check_dependencies(fv.format)
  loaded = model_flags.load_model_from_flags(fv)
  settings = model_flags.eval_settings_from_flags(fv, loaded)
  image_size, eval_preproc = settings["image_size"], settings["eval_preproc"]
  preprocessing = None
  if fv.with_preprocessing:
    with cli.usage_errors():
      preprocessing = serving.Preprocessing(image_size, eval_preproc, fv.input_size,
                                            settings["normalization"])
  print(settings.describe(), file=sys.stderr, flush=True)
  # XLA's own convolutions and no loops: the plainest graph for other runtimes.
  folded = loaded.fold(conv_impl="xla", block_loop="unroll")
  serve = serving.served_function(folded, fv.compute_dtype, preprocessing)
  shape, dtype = serving.input_spec(image_size, preprocessing, fv.batch_size)
  writers.export(serve, shape, dtype, fv.format, pathlib.Path(fv.out))
  output = "probabilities" if preprocessing else "logits"
  batch = fv.batch_size or "batch"
  print(f"Wrote {fv.out}: {fv.format}, {loaded.name} from {loaded.source}, input "
        f"[{batch}, {shape[1]}, {shape[2]}, 3] {dtype.name}, output [{batch}, {loaded.num_classes}] "
        f"{output}, computed in {fv.compute_dtype}.")
  if fv.format == "tflite" and fv.batch_size is None:
    print("Note: TFLite runs a file with a free batch several times slower than one with a "
          "fixed --batch_size (its shape ops and broadcasts stay in the graph); see "
          "docs/export.md.", file=sys.stderr)
