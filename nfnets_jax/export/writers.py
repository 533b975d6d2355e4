"""Writers of the four export formats, each from a served function (`serving`).

`export(serve, input_shape, input_dtype, fmt, out)` writes one file (a
directory for SavedModel); `check_export_format` and `check_dependencies` say early
what cannot work and what to install.
"""

from __future__ import annotations

import importlib
import pathlib
import tempfile
from typing import Any, Optional, Sequence

from nfnets_jax.export import onnx_graph, serving

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


def check_export_format(fmt: str, dtype: str = "float32") -> None:
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
  check_export_format(fmt)
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
  onnx_graph.save(onnx_graph.to_onnx(serve, input_shape, input_dtype), out)
