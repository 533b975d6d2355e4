"""timm 1.x's training input pipeline as the peer of `bench_input_pipeline.py --vs-timm`.

timm's ImageNet training transforms (Inception crop, flip, bicubic resize, and with
augmentation RandAugment 'rand-m5-n4' = 4 layers at magnitude 5, each op applied
with probability 0.5, as timm does) in a torch DataLoader over the same image
folder, then timm's `Mixup` (mixup alpha 0.2 and CutMix, switching with probability
0.5, one ratio per batch: its default mode) on each batch, in the main process.

One thread: no DataLoader workers, one torch thread. N threads: N worker
processes. CPU time counts the main process and its workers (from /proc).
Run as a script (one JSON line out), so that torch never shares a process with
TensorFlow: the benchmark starts it once per measurement.
"""

import argparse
import json
import os
import time


def _cpu_seconds(pids) -> float:
  ticks = os.sysconf("SC_CLK_TCK")
  total = 0.0
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
  return total


def measure(root: str, *, batch: int, image_size: int, augment: bool, threads: int,
            warmup: int, batches: int) -> dict:
  import torch
  from timm.data import ImageDataset, Mixup, create_transform

  torch.set_num_threads(1)
  transform = create_transform(image_size, is_training=True, interpolation="bicubic",
                               auto_augment="rand-m5-n4" if augment else None,
                               color_jitter=None)
  dataset = ImageDataset(os.path.join(root, "train"), transform=transform)
  workers = 0 if threads == 1 else threads
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=2 if workers else None)
  mixup = (Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1,
                 num_classes=len(dataset.reader.class_to_idx)) if augment else None)

  def endless():
    while True:
      yield from loader

  stream = endless()

  def step():
    images, labels = next(stream)
    if mixup is not None:
      images, labels = mixup(images, labels)
    return images

  for _ in range(warmup):
    step()
  it = loader._iterator  # pylint: disable=protected-access
  pids = [os.getpid()] + ([w.pid for w in it._workers] if workers else [])  # pylint: disable=protected-access
  start, cpu_start = time.perf_counter(), _cpu_seconds(pids)
  for _ in range(batches):
    step()
  elapsed = time.perf_counter() - start
  cpu = _cpu_seconds(pids) - cpu_start
  return {"images_per_s": batches * batch / elapsed, "images_per_cpu_s": batches * batch / cpu,
          "seconds": elapsed, "cpu_seconds": cpu}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="folder with train/<class>/<image>")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--image-size", type=int, default=192)
  parser.add_argument("--augment", action="store_true")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batches", type=int, default=15)
  args = parser.parse_args()
  print(json.dumps(measure(args.root, batch=args.batch, image_size=args.image_size,
                           augment=args.augment, threads=args.threads, warmup=args.warmup,
                           batches=args.batches)))


if __name__ == "__main__":
  main()
