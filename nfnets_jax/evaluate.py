"""Top-1, top-5 and loss of a checkpoint over a whole dataset split.

  python -m nfnets_jax.evaluate --checkpoint=F0_safe.npz --model=nfnet:F0
  # `make demo`'s workdir, scored as the trainer scores it (its record says how):
  python -m nfnets_jax.evaluate --checkpoint=workdirs/demo --dataset=digits --split=test

Every example of the split is scored exactly once, on every device of every
process: the batch is split over a mesh of all devices, each process reads its
own part of the split, and the padding that evens out the last batches is
masked out. Multi-host jobs run the same command on every host (the flags
below, or a cluster JAX recognises; see launch/). Process 0 shows progress on
stderr and prints a summary and, as the last line of stdout, a JSON object
with the results for scripts.

Defaults: a training workdir or checkpoint records its model, classes, model
arguments, eval image size, preprocessing and normalisation, dataset, split and
EMA choice (timm's weights, `timm:<name>`, record timm's evaluation settings), and
each flag left out takes the recorded value (stderr says which setting came from
where); otherwise the model's published test resolution, 'resize_crop_32',
ImageNet normalisation, imagenet2012's validation split, the raw weights. The
batch is 32 per device.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from nfnets_jax import cli, models, weights
from nfnets_jax.cli import model_flags, runtime

#: Examples per device when --batch_size is not given.
DEFAULT_PER_DEVICE_BATCH = 32
#: The name of the scored weights in the eval step's input and output.
WEIGHTS = "params"


def evaluate_params(loaded: weights.LoadedModel, dataset: str = "imagenet2012",
                    split: str = "validation", *, batch_size: Optional[int] = None,
                    image_size: Optional[int] = None,
                    eval_preproc: str = model_flags.DEFAULT_EVAL_PREPROC,
                    normalization: Optional[str] = None,
                    data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                    val_fraction: float = 0.0, compute_dtype: Any = "float32",
                    progress: str = "auto") -> dict[str, Any]:
  """Scores `loaded` on a dataset split; the same call on every process of a job.

  Args:
    loaded: the weights and their network (`weights.load_model`).
    dataset, split: as `nfnets_jax.data.load` takes them.
    batch_size: global batch, divisible by the number of devices (default 32
      per device).
    image_size: network input side (default the model's test resolution).
    eval_preproc: 'resize_crop_<pct>', 'center_crop_<fraction>' or 'crop_resize'.
    normalization: 'imagenet' or 'inception' (`data.preproc_spec.NORMALIZATIONS`); default
      the one `loaded` records (timm's weights record theirs), else 'imagenet'.
    data_dir, manual_dir: TFDS directories.
    val_fraction: for a single-tree image folder, the part held out as 'validation'.
    compute_dtype: float32, bfloat16 or float16.
    progress: 'bar' (tqdm), 'lines', 'none', or 'auto' (a bar on a terminal,
      else lines); shown by process 0 only.

  Returns:
    top1, top5, loss (means over the real examples of every process),
    num_examples, seconds (wall time of the pass, compilation included),
    images_per_sec (after the first batch, so without compilation),
    skipped_files (corrupt files this process dropped; each is also logged),
    and the settings used.

  Raises:
    ValueError: the dataset has more classes than the model outputs; no file of the
      split could be read (`UnreadableSplitError`), or no example was scored
      (`NoExamplesError`: there is no accuracy to report).
  """
  import jax
  import jax.numpy as jnp

  from nfnets_jax.train import steps

  num_devices, num_processes = jax.device_count(), jax.process_count()
  if batch_size is None:
    batch_size = DEFAULT_PER_DEVICE_BATCH * num_devices
  check_batch_size(batch_size)
  image_size = models.default_image_size(loaded.name) if image_size is None else image_size
  if normalization is None:
    normalization = loaded.normalization
  if progress not in ("auto", "bar", "lines", "none"):
    raise ValueError(f"progress must be 'auto', 'bar', 'lines' or 'none', got {progress!r}")

  mesh = steps.make_mesh()
  eval_step = steps.make_eval_step(loaded.transform(), loaded.num_classes,
                                   jnp.dtype(compute_dtype), mesh)
  params = replicated_params(loaded.params, mesh)
  batches = _this_process_batches(dataset, split, batch_size // num_processes, image_size,
                                  eval_preproc, normalization, data_dir, manual_dir, val_fraction)
  check_classes_fit(batches.num_classes, loaded, dataset)
  reporter = _Progress(len(batches), batch_size, progress, enabled=jax.process_index() == 0)
  totals, timer = _score(eval_step, params, batches, mesh, reporter)
  reporter.close()
  count = totals.count(WEIGHTS)
  totals.require_examples(WEIGHTS, f"{dataset!r} split {split!r}")
  return {
      "model": loaded.name,
      "checkpoint": loaded.source,
      "step": loaded.step,
      "dataset": dataset,
      "split": split,
      "image_size": image_size,
      "eval_preproc": eval_preproc,
      "normalization": normalization,
      "batch_size": batch_size,
      "compute_dtype": jnp.dtype(compute_dtype).name,
      "num_devices": num_devices,
      "num_processes": num_processes,
      **totals.means(WEIGHTS),
      "num_examples": count,
      "skipped_files": len(batches.skipped_files),
      "seconds": timer.seconds,
      "images_per_sec": timer.images_per_sec(count, len(batches)),
  }


def replicated_params(params: Any, mesh: Any) -> Any:
  """`params` as arrays replicated over `mesh`. Every process holds the same weights;
  make_array_from_callback builds the global arrays without any cross-host transfer."""
  import jax

  from nfnets_jax.train import steps

  sharding = steps.replicated(mesh)
  return jax.tree_util.tree_map(
      lambda leaf: jax.make_array_from_callback(np.shape(leaf), sharding,
                                                lambda index: np.asarray(leaf)[index]),
      params)


def _this_process_batches(dataset: str, split: str, local_batch: int, image_size: int,
                          eval_preproc: str, normalization: str, data_dir: Optional[str],
                          manual_dir: Optional[str], val_fraction: float):
  """This process's part of the split, in evaluation batches (`data.load`)."""
  import jax

  from nfnets_jax import data

  return data.load(dataset, split, is_training=False, batch_dims=(local_batch,),
                   image_size=image_size, eval_preproc=eval_preproc,
                   normalization=normalization, data_dir=data_dir,
                   manual_dir=manual_dir, val_fraction=val_fraction,
                   process_index=jax.process_index(), process_count=jax.process_count())


def check_classes_fit(num_classes: int, loaded: weights.LoadedModel, dataset: str) -> None:
  """A ValueError when the dataset has classes the model cannot predict."""
  if num_classes > loaded.num_classes:
    raise ValueError(
        f"{dataset!r} has {num_classes} classes but the model {loaded.name} has "
        f"{loaded.num_classes} outputs; labels beyond them could never be predicted. Check "
        "--dataset and --checkpoint (or --num_classes).")


class _Timer:
  """Wall time of the pass, and throughput after its first (compiling) batch."""

  def __init__(self):
    self._start = time.perf_counter()
    self._warm: Optional[tuple[float, float]] = None  # (time, examples) after the first batch
    self.seconds = 0.0

  def batch_done(self, examples: float) -> float:
    """Records a finished batch (`examples` real examples so far); the rate to show."""
    now = time.perf_counter()
    self.seconds = now - self._start
    if self._warm is None:
      self._warm = (now, examples)
      return examples / self.seconds
    # Throughput since the first batch, whose time is mostly compilation.
    return (examples - self._warm[1]) / max(now - self._warm[0], 1e-9)

  def stop(self) -> None:
    """The pass is over: `seconds` is its whole wall time."""
    self.seconds = time.perf_counter() - self._start

  def images_per_sec(self, count: int, num_steps: int) -> float:
    warm = self._warm
    if warm is not None and num_steps > 1 and self.seconds > warm[0] - self._start:
      return (count - warm[1]) / (self.seconds - (warm[0] - self._start))
    return count / self.seconds if self.seconds > 0 else 0.0


def _score(eval_step, params: Any, batches, mesh: Any, reporter: "_Progress"):
  """Runs every batch through `eval_step`; returns the totals and the timer.

  The previous batch's sums are fetched while the next one runs: the device stays
  busy and the progress shown is what has really been computed.
  """
  import jax

  from nfnets_jax.train import eval_totals, steps

  totals, timer, pending = eval_totals.EvalTotals(), _Timer(), None

  def collect(result):
    totals.add(jax.device_get(result))
    examples = totals.count(WEIGHTS)
    reporter.update(examples, timer.batch_done(examples))

  for batch in batches:
    result = eval_step({WEIGHTS: params}, steps.global_batch(mesh, batch))
    if pending is not None:
      collect(pending)
    pending = result
  if pending is not None:
    collect(pending)
  timer.stop()
  return totals, timer


def check_batch_size(batch_size: int) -> None:
  """A clear error unless `batch_size` splits evenly over every device of the job."""
  import jax

  num_devices = jax.device_count()
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % num_devices:
    raise cli.UsageError(
        f"--batch_size={batch_size} must be a positive multiple of the number of devices "
        f"({num_devices}: {jax.local_device_count()} per process x {jax.process_count()} "
        f"processes), e.g. {DEFAULT_PER_DEVICE_BATCH * num_devices}.")


class _Progress:
  """A tqdm bar on a terminal, else a line every ~10% of the batches (stderr)."""

  def __init__(self, num_steps: int, batch_size: int, mode: str, enabled: bool):
    self._num_steps = num_steps
    self._done = 0
    self._next_line = 1
    self._bar = None
    self._lines = False
    if not enabled or mode == "none":
      return
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
      from tqdm import tqdm
      self._bar = tqdm(total=num_steps, unit="batch", file=sys.stderr, dynamic_ncols=True,
                       desc="evaluating")
    else:
      self._lines = True
      print(f"evaluating: {num_steps} batches of {batch_size}", file=sys.stderr, flush=True)

  def update(self, examples: float, rate: float) -> None:
    """One more batch done: `examples` real examples so far, at `rate` images/s."""
    self._done += 1
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix_str(f"{rate:.1f} img/s", refresh=False)
    elif self._lines and (self._done >= self._next_line or self._done == self._num_steps):
      print(f"evaluating: batch {self._done}/{self._num_steps} "
            f"({100 * self._done / max(self._num_steps, 1):.0f}%), {int(examples)} examples, "
            f"{rate:.1f} img/s", file=sys.stderr, flush=True)
      self._next_line = self._done + max(1, math.ceil(self._num_steps / 10))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


# ----------------------------------------------------------------------------- CLI


def _define_flags():
  """A private flag set, so this tool can share a process with other CLIs."""
  from absl import flags

  fv = flags.FlagValues()
  model_flags.define_model_flags(fv)
  flags.DEFINE_string("dataset", None,
                      "Dataset: 'imagenet2012', 'digits' (embedded), 'folder:<path>' or any "
                      "TFDS image classification dataset. Default: the one the training run "
                      f"evaluated on, else {model_flags.DEFAULT_DATASET!r}.", flag_values=fv)
  flags.DEFINE_string("split", None, "Split to score, e.g. 'validation', 'train[:10000]'. "
                      "Default: the training run's eval split (of its dataset), else "
                      f"{model_flags.DEFAULT_SPLIT!r}.", flag_values=fv)
  flags.DEFINE_float("val_fraction", None, "For a single-tree 'folder:<path>': the fraction "
                     "of each class held out as 'validation'. Default: the training run's "
                     "(of its dataset), else 0.", flag_values=fv)
  flags.DEFINE_integer("batch_size", None,
                       f"Global batch size, a multiple of the number of devices. Default: "
                       f"{DEFAULT_PER_DEVICE_BATCH} per device.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "TFDS data directory. Default: the training run's "
                      "(of its dataset), else TFDS's.", flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "Where the ImageNet archives are, if not prepared "
                      "yet (default <data_dir>/downloads/manual).", flag_values=fv)
  flags.DEFINE_enum("progress", "auto", ["auto", "bar", "lines", "none"],
                    "Progress on stderr (process 0): a tqdm bar, a line per ~10%, or nothing; "
                    "'auto': a bar on a terminal, else lines.", flag_values=fv)
  runtime_flags = runtime.define_flags(fv)
  return fv, runtime_flags


def _summary(results: dict[str, Any]) -> str:
  return (f"{results['model']} on {results['dataset']}:{results['split']} at "
          f"{results['image_size']}px ({results['eval_preproc']}): top-1 {results['top1']:.4f}, "
          f"top-5 {results['top5']:.4f}, loss {results['loss']:.4f} over "
          f"{results['num_examples']} examples, {results['images_per_sec']:.1f} images/s")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the evaluation on `argv` (program name first, as in `sys.argv`); returns the exit code.

  Exit statuses as `nfnets_jax.cli` documents them: 1 when the checkpoint or
  the dataset cannot be used, 2 for a bad flag or value.
  """
  fv, runtime_flags = _define_flags()
  return cli.run_tool(argv, fv, __doc__ or "", lambda _: _evaluate_from_flags(fv, runtime_flags))


def _evaluate_from_flags(fv, runtime_flags: runtime.RuntimeFlags) -> None:
  """Scores the checkpoint the parsed flags name; process 0 prints the results."""
  runtime.setup(runtime_flags)
  import jax  # After setup: jax.distributed must initialise before devices are used.

  if fv.batch_size is not None:
    check_batch_size(fv.batch_size)
  loaded = model_flags.load_model_from_flags(fv)
  settings = model_flags.eval_settings_from_flags(fv, loaded, dataset=True)
  if jax.process_index() == 0:
    print(settings.describe(), file=sys.stderr, flush=True)
  results = evaluate_params(
      loaded, settings["dataset"], settings["split"], batch_size=fv.batch_size,
      image_size=settings["image_size"], eval_preproc=settings["eval_preproc"],
      normalization=settings["normalization"], data_dir=settings["data_dir"],
      manual_dir=fv.manual_dir,
      val_fraction=settings.values.get("val_fraction", 0.0), compute_dtype=fv.compute_dtype,
      progress=fv.progress)
  results["ema"] = settings["ema"]
  results["settings_from"] = settings.origins
  if jax.process_index() == 0:
    print(_summary(results))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
  cli.run(main)
