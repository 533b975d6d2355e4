"""Throughput of the NFNets training input pipeline (images/s), and how it scales with threads.

Writes synthetic ImageNet-sized JPEGs (default 500x375, smooth content plus
noise so they compress like photos) into an image folder, then times
`nfnets_jax.data.load` on it at the published training settings: 192 px,
'cutmix_mixup_randaugment_405', fast (non-deterministic) mode, for each
tf.data thread-pool size. Reported images/s count output images (a mixed image
consumes two decoded ones). Also reported: images per CPU-second of the
process (all its threads), which estimates per-core cost even when other work
shares the machine and wall-clock scaling is not measurable.

    python benchmarks/bench_input_pipeline.py                 # 1 and 2 threads
    python benchmarks/bench_input_pipeline.py --threads 1 2 4 --batches 30
    python benchmarks/bench_input_pipeline.py --per-op        # CPU ms of each stage
    python benchmarks/bench_input_pipeline.py --vs-timm       # ours and timm's, same files
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image


def write_jpegs(root: str, count: int, width: int, height: int, classes: int = 10) -> None:
  """`count` photo-like JPEGs under root/train/<class>/ (skipped if already there)."""
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, "train", f"class_{i % classes:02d}")
    path = os.path.join(folder, f"img_{i:05d}.jpg")
    if os.path.exists(path):
      continue
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    with open(path, "wb") as f:
      f.write(buf.getvalue())


def measure(name: str, *, batch: int, image_size: int, augment_name, threads, deterministic: bool,
            warmup: int, batches: int, **options) -> dict:
  """Our pipeline: output images per second and per CPU-second of the process (all threads).

  `options` go to `load` as they are (e.g. augment_before_mix, mix_source).
  """
  from nfnets_jax.data import load
  it = load(name, "train", is_training=True, batch_dims=(batch,), image_size=image_size,
            augment_name=augment_name, num_threads=threads,
            seed=0 if deterministic else None, deterministic=deterministic, **options)
  for _ in range(warmup):
    next(it)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - start
  cpu = time.process_time() - cpu_start
  return {"augment_name": augment_name, "threads": threads, "deterministic": deterministic,
          **options, "images_per_s": batches * batch / elapsed, "seconds": elapsed,
          "images_per_cpu_s": batches * batch / cpu, "cpu_seconds": cpu}


FULL = "cutmix_mixup_randaugment_405"
#: --vs-timm rows: (label, ours: load() options or None for timm, timm: with augmentation).
VS_TIMM_ROWS = [
    ("ours, no augmentation", dict(augment_name=None), None),
    ("ours, full, mix_source='stream' (published)",
     dict(augment_name=FULL, augment_before_mix=False, mix_source="stream"), None),
    ("ours, full, mix_source='batch'",
     dict(augment_name=FULL, augment_before_mix=False, mix_source="batch"), None),
    ("timm, no augmentation (crop, flip, resize)", None, False),
    ("timm, full (rand-m5-n4, Mixup/CutMix)", None, True),
]


def vs_timm(args, name: str) -> list[dict]:
  """Ours and timm's pipelines on the same files, each at every thread count, in turn."""
  import timm_input_pipeline  # pylint: disable=import-outside-toplevel
  runs = []
  for label, ours, timm_augment in VS_TIMM_ROWS:
    if ours is None and args.skip_timm:
      continue
    for threads in args.threads:
      if ours is not None:
        options = dict(ours)
        if options.get("mix_source") == "stream":
          del options["mix_source"]  # The default; lets the code before mix_source run too.
        try:
          result = measure(name, batch=args.batch, image_size=args.image_size, threads=threads,
                           deterministic=False, warmup=args.warmup, batches=args.batches,
                           **options)
        except TypeError as err:  # Code from before an option existed.
          print(f"{label:48s} skipped: {err}", flush=True)
          break
      else:
        command = [sys.executable, timm_input_pipeline.__file__, "--root", args.workdir,
                   "--batch", str(args.batch), "--image-size", str(args.image_size),
                   "--threads", str(threads), "--warmup", str(args.warmup),
                   "--batches", str(args.batches)] + ["--augment"] * timm_augment
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
      result.update(label=label, threads=threads)
      runs.append(result)
      print(f"{label:48s} threads={threads:<2d} {result['images_per_s']:7.1f} images/s "
            f"{result['images_per_cpu_s']:7.1f} images/CPU-s", flush=True)
  return runs


def print_per_op(args) -> None:
  import input_pipeline_ops  # pylint: disable=import-outside-toplevel
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(args.workdir, "train"))
                 for f in files)[:args.per_op_images]
  rows = input_pipeline_ops.profile(paths, args.image_size, magnitude=5,
                                    count=args.per_op_count, repeats=3)
  print(f"| stage ({args.width}x{args.height} JPEGs, {args.image_size} px, one thread) "
        f"| CPU ms per element |")
  print("| --- | --- |")
  for name, ms in rows:
    print(f"| {name} | {ms:.3f} |")
  load1, load5, _ = os.getloadavg()
  print(f"{os.cpu_count()} CPUs, load average {load1:.1f} / {load5:.1f} (1 / 5 min)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "nfnets_bench_jpegs"))
  parser.add_argument("--num-images", type=int, default=512)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--image-size", type=int, default=192)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batches", type=int, default=15)
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--vs-timm", action="store_true",
                      help="instead: ours (no augmentation, full 'stream', full 'batch') and "
                           "timm's pipeline (timm_input_pipeline.py) on the same files")
  parser.add_argument("--skip-timm", action="store_true", help="--vs-timm: only our rows")
  parser.add_argument("--per-op", action="store_true",
                      help="instead: CPU ms per image of each stage (input_pipeline_ops.py)")
  parser.add_argument("--per-op-images", type=int, default=32,
                      help="--per-op: distinct images cycled through")
  parser.add_argument("--per-op-count", type=int, default=200,
                      help="--per-op: elements per timing (the least of 3 timings is kept)")
  args = parser.parse_args()

  write_jpegs(args.workdir, args.num_images, args.width, args.height)
  if args.per_op:
    print_per_op(args)
    return
  name = f"folder:{args.workdir}"
  runs = []
  if args.vs_timm:
    runs, rows = vs_timm(args, name), []
  else:
    rows = [(FULL, False), (None, False), (FULL, True)]
  for augment_name, deterministic in rows:
    for threads in args.threads:
      result = measure(name, batch=args.batch, image_size=args.image_size,
                       augment_name=augment_name, threads=threads, deterministic=deterministic,
                       warmup=args.warmup, batches=args.batches)
      runs.append(result)
      print(f"{str(augment_name):32s} {'deterministic' if deterministic else 'fast':13s} "
            f"threads={threads:<3d} {result['images_per_s']:8.1f} images/s "
            f"{result['images_per_cpu_s']:8.1f} images/CPU-s", flush=True)
  load1, load5, _ = os.getloadavg()
  summary = {"cpus": os.cpu_count(), "loadavg_1m_5m": [load1, load5],
             "source": f"{args.num_images} synthetic {args.width}x{args.height} JPEGs",
             "image_size": args.image_size, "batch": args.batch, "runs": runs}
  print(f"{os.cpu_count()} CPUs, load average {load1:.1f} / {load5:.1f} (1 / 5 min)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
