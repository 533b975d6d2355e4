"""NFNet-F0 inference in its exported forms, against the JAX network and timm, same run.

Contenders, each run on the same images at batch 1 and 8 (256 px by default),
rounds interleaved (benchmarks/timing.py):

* `jax`: the training-form network as the evaluate/classify tools run it
  (`models.transform(...).apply`, jitted, default lowering);
* `jax folded`: `models.fold_for_inference` of the same parameters, jitted;
* `onnxruntime`, `tf savedmodel`, `tflite` (LiteRT, XNNPACK): the files
  `python -m nfnets_jax.export` writes for them (from the same parameters,
  each in a process of its own), loaded in their runtimes, batch free;
  `tflite fixed`: a TFLite file per batch size (`--batch_size`);
* `timm eager`: timm's `dm_nfnet_f0`, random init, `eval()` under
  `torch.inference_mode`.

Our parameters are the initial ones with the residual branches switched on
(skip gains 0.5); before timing, each export's logits are compared with the JAX
network's and the largest difference is printed relative to the largest logit.
Ratios are `jax`'s time over each contender's (above 1: the contender is faster).
Needs the `export` and `peers` extras.

Usage:
  python benchmarks/bench_export.py                         # the README's table
  python benchmarks/bench_export.py --batches 1 --repeats 3 --size 128
"""

import argparse
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

# timm first: importing torch after TensorFlow/JAX plugins can crash (see tests/conftest.py).
import timm  # noqa: I001
import torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nfnets_jax import models, weights  # noqa: E402
from timing import add_cpu_tuning_flag, alternate, apply_cpu_tuning  # noqa: E402

NUM_CLASSES = 1000


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="F0")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size")
  parser.add_argument("--formats", default="onnx,savedmodel,tflite,tflite-fixed",
                      help="comma-separated exported formats to run (tflite-fixed: one TFLite "
                           "file per batch size)")
  parser.add_argument("--export-dir", default=None,
                      help="where the exports go; files already there (from a run with the "
                           "same arguments) are reused. Default: a new temporary directory")
  add_cpu_tuning_flag(parser)
  return parser.parse_args()


def trained_like_params(model):
  """The initial parameters with every `skip_gain` 0.5 (0 at init switches the residual
  branches off, which would leave most of the network out of the comparisons)."""
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return {module: {k: (jnp.full_like(v, 0.5) if k == "skip_gain" else v) for k, v in leaves.items()}
          for module, leaves in params.items()}


def onnx_runner(path: pathlib.Path):
  import onnxruntime
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda x: session.run(None, {name: x})[0]


def savedmodel_runner(path: pathlib.Path):
  import tensorflow as tf
  serve = tf.saved_model.load(str(path)).signatures["serving_default"]
  return lambda x: serve(images=tf.constant(x))["output"].numpy()


def tflite_runner(path: pathlib.Path):
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  shape = [None]

  def run(x):
    if shape[0] != x.shape:
      interpreter.resize_tensor_input(inp["index"], list(x.shape))
      interpreter.allocate_tensors()
      shape[0] = x.shape
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])

  return run


RUNNERS = {"onnx": ("onnxruntime", onnx_runner), "savedmodel": ("tf savedmodel", savedmodel_runner),
           "tflite": ("tflite", tflite_runner), "tflite-fixed": ("tflite fixed", tflite_runner)}


def export_file(params: pathlib.Path, name: str, fmt: str, path: pathlib.Path, size: int,
                batch_size) -> None:
  """The export CLI in a process of its own: converting a 270 MiB network takes
  gigabytes, which this process (holding every contender) would keep."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "nfnets_jax.export", f"--checkpoint={params}",
                  f"--model={name}", f"--format={fmt}", f"--out={path}", f"--image_size={size}",
                  *([f"--batch_size={batch_size}"] if batch_size else [])],
                 check=True, capture_output=True)
  size_mb = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*"))
                if p.is_file()) / 2**20
  print(f"export {path.name}: {time.perf_counter() - start:.1f} s, {size_mb:.0f} MiB")


def main() -> None:
  args = parse_args()
  tuning = apply_cpu_tuning(args)
  name = f"nfnet:{args.variant}"
  batches = [int(b) for b in args.batches.split(",")]
  print(f"{name} inference at {args.size} px, float32, CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}, "
        f"timm {timm.__version__}. {tuning}")

  model = models.transform(name, NUM_CLASSES)
  params = trained_like_params(model)
  unfolded = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])
  start = time.perf_counter()
  folded = models.fold_for_inference(name, params)
  print(f"fold_for_inference: {time.perf_counter() - start:.1f} s")
  folded_apply = jax.jit(folded.apply)

  runners = {}  # label -> {batch: run}
  tmp = pathlib.Path(args.export_dir or tempfile.mkdtemp(prefix="bench_export_"))
  tmp.mkdir(parents=True, exist_ok=True)
  weights.save_params_npz(params, tmp / "params.npz")
  def exported(fmt, path, batch_size):
    if not path.exists():
      export_file(tmp / "params.npz", name, fmt.removesuffix("-fixed"), path, args.size,
                  batch_size)
    return RUNNERS[fmt][1](path)

  for fmt in [f for f in args.formats.split(",") if f]:
    label = RUNNERS[fmt][0]
    if fmt.endswith("-fixed"):  # One file per batch size.
      runners[label] = {b: exported(fmt, tmp / f"model_{fmt}_{b}", b) for b in batches}
    else:  # One file for every batch size.
      runners[label] = dict.fromkeys(batches, exported(fmt, tmp / f"model_{fmt}", None))

  torch.set_num_threads(os.cpu_count())
  peer = timm.create_model(f"dm_nfnet_{args.variant.lower()}", pretrained=False).eval()

  for batch in batches:
    x = np.random.default_rng(batch).standard_normal((batch, args.size, args.size, 3),
                                                     np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    reference = np.asarray(unfolded(params, x))
    scale = np.abs(reference).max()
    outputs = {"jax folded": np.asarray(folded_apply(folded.params, x)),
               **{label: np.asarray(runs[batch](x)) for label, runs in runners.items()}}
    for label, got in outputs.items():
      print(f"  batch {batch}: {label} max |logit - jax| / max |logit| = "
            f"{np.abs(got - reference).max() / scale:.1e}")

    def timm_eager():
      with torch.inference_mode():
        peer(xt)

    fns = {"jax": lambda: unfolded(params, x).block_until_ready(),
           "jax folded": lambda: folded_apply(folded.params, x).block_until_ready(),
           **{label: (lambda run=runs[batch]: run(x)) for label, runs in runners.items()},
           "timm eager": timm_eager}
    timm_eager()
    med = alternate(fns, args.repeats)
    print(f"batch {batch} ({args.repeats} rounds, median):")
    for label, seconds in med.items():
      print(f"  {label:<14} {1e3 * seconds:9.1f} ms  {batch / seconds:7.2f} img/s  "
            f"jax / this {med['jax'] / seconds:5.2f}")


if __name__ == "__main__":
  main()
