"""Transfer on the embedded digits: pretrain on classes 0-4, fine-tune on 5-9 from few labels.

Four runs of the trainer, each a plain `python -m nfnets_jax.train` command
(printed, so any one can be rerun by hand):

1. pretrain `nfnet:nano` on every training image of digits 0-4 (the demo's
   recipe, experiments/demo.py);
2. fine-tune it on digits 5-9 with `--per_class` labelled images of each
   (experiments/finetune.py:nfnet:nano, `init_from` the pretraining workdir,
   the classifier re-initialised: same size, new classes);
3. the same run from scratch (`init_from=None`): same steps, data and recipe;
4. a linear probe: run 2 with everything but the classifier frozen.

Each is scored on every test image of digits 5-9; the table gives the top-1
of the raw and the EMA weights. Takes a few minutes on a 2-core CPU.

  python benchmarks/transfer_digits.py --workdir=/tmp/transfer_digits
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PRETRAIN = ["--config=experiments/demo.py", "--config.num_classes=5",
            "--config.dataset.classes=0-4"]
# The digits' own image handling (as experiments/demo.py): 8x8 images resized to
# 32x32 whole (no crop, no flip, which would change what digit it is).
DIGITS = ["--config.dataset.name=digits", "--config.dataset.train_split=train",
          "--config.dataset.eval_split=test", "--config.dataset.image_size=32",
          "--config.dataset.eval_image_size=32", "--config.dataset.train_preproc=resize",
          "--config.dataset.eval_preproc=resize_crop_1", "--config.dataset.deterministic=True",
          "--config.dataset.autotune=False", "--config.compute_dtype=float32"]
LINEAR_PROBE = "^(?!NFNet/~/linear/)"


def finetune_flags(per_class: int, steps: int, batch: int) -> list[str]:
  return ["--config=experiments/finetune.py:nfnet:nano", *DIGITS, "--config.num_classes=5",
          "--config.dataset.classes=5-9", f"--config.dataset.train_examples_per_class={per_class}",
          f"--config.train_batch_size={batch}", "--config.eval_batch_size=120",
          f"--config.num_train_steps={steps}", f"--config.warmup_steps={steps // 10}",
          f"--config.log_every_steps={steps}", f"--config.checkpoint_every_steps={steps}"]


def run(name: str, flags: list[str], workdir: str, fresh: bool = True) -> dict:
  """Runs the trainer with `flags` in `workdir/name` (emptied first if `fresh`); its results."""
  path = os.path.join(workdir, name)
  if fresh:
    shutil.rmtree(path, ignore_errors=True)
  command = [sys.executable, "-m", "nfnets_jax.train", *flags, f"--workdir={path}"]
  print("$", " ".join(f"'{a}'" if any(c in a for c in "^(?!") else a for a in command[1:]),
        flush=True)
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  results["wall_s"] = time.perf_counter() - start
  report = [line for line in proc.stderr.splitlines() if "init_from" in line or "freeze:" in line]
  for line in report:
    print("  ", line.split("] ", 1)[-1])
  print(f"   top-1 {results['top1']:.4f}, EMA {results['ema_top1']:.4f} on "
        f"{results['num_examples']} test images ({results['wall_s']:.0f} s)", flush=True)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/transfer_digits")
  parser.add_argument("--per_class", type=int, default=10, help="labelled images per class")
  parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
  parser.add_argument("--lr", type=float, default=0.1, help="fine-tuning base_lr (per 256)")
  parser.add_argument("--probe_lr", type=float, default=0.4, help="linear probe base_lr")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="seeds of the three small runs (the table gives their mean)")
  parser.add_argument("--reuse_pretrain", action="store_true",
                      help="evaluate the pretraining workdir if it is there instead of retraining")
  args = parser.parse_args()
  batch = 5 * args.per_class  # every labelled image in every step
  pretrained = os.path.join(args.workdir, "pretrain_0-4")
  if args.reuse_pretrain and os.path.isdir(os.path.join(pretrained, "checkpoints")):
    pretrain = run("pretrain_0-4", [*PRETRAIN, "--mode=eval"], args.workdir, fresh=False)
  else:
    pretrain = run("pretrain_0-4", PRETRAIN, args.workdir)
  common = finetune_flags(args.per_class, args.steps, batch)
  variants = {
      "fine-tuned": [f"--config.init_from={pretrained}", "--config.reinit_classifier=True",
                     f"--config.optimizer.base_lr={args.lr}"],
      "from scratch": ["--config.init_from=None", f"--config.optimizer.base_lr={args.lr}"],
      "linear probe": [f"--config.init_from={pretrained}", "--config.reinit_classifier=True",
                       f"--config.freeze={LINEAR_PROBE}",
                       f"--config.optimizer.base_lr={args.probe_lr}"],
  }
  top1 = {name: [] for name in variants}
  for seed in args.seeds:
    for name, flags in variants.items():
      results = run(f"{name.replace(' ', '_')}_seed{seed}",
                    [*common, *flags, f"--config.seed={seed}"], args.workdir)
      top1[name].append((results["top1"], results["ema_top1"]))
  print(f"\n| digits 5-9, {args.per_class} labelled images per class, {args.steps} steps, "
        f"seeds {args.seeds} | top-1 | EMA top-1 |\n| --- | --- | --- |")
  for name, values in top1.items():
    raw, ema = (sum(v[i] for v in values) / len(values) for i in (0, 1))
    each = ", ".join(f"{v[0]:.3f}" for v in values)
    print(f"| {name} | {raw:.4f} ({each}) | {ema:.4f} |")
  print(f"(pretraining on digits 0-4: top-1 {pretrain['top1']:.4f} on their "
        f"{pretrain['num_examples']} test images)")


if __name__ == "__main__":
  main()
