"""Train-step time with frozen parameters: every parameter trained, the body frozen
(a linear probe), and the stem plus the first blocks frozen.

Frozen parameters get no gradient (train/freeze.py): the step differentiates
only the trainable ones, so a linear probe runs no backward pass through the
body. Each form is the trainer's own step (`steps.make_train_step`) with the
NFNet optimizer (AGC on), timed in interleaved rounds; the ratio is the
all-trained step's time over each form's.

  python benchmarks/bench_freeze.py --model=nfnet:nano --image_size=32 --batch=64
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import models, optim
from nfnets_jax.train import freeze, steps
from timing import add_cpu_tuning_flag, alternate, apply_cpu_tuning  # benchmarks/timing.py

FORMS = {"all trained": None, "linear probe": "^(?!NFNet/~/linear/)",
         "stem + first 2 blocks frozen": "stem|nf_block/|nf_block_1/"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="nfnet:nano")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  add_cpu_tuning_flag(parser)
  args = parser.parse_args()
  tuning = apply_cpu_tuning(args)
  model = models.transform(args.model, 10)
  layout = models.stacked_layout(args.model, 10)
  mesh = steps.make_mesh(jax.devices()[:1])
  size = (args.image_size, args.image_size)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *size, 3)))
  optimizer = optim.nfnet_optimizer(0.1, clipping=0.01, record_clip_fraction=True)
  ema = optim.params_ema(0.999)
  rng = np.random.default_rng(0)
  batch = steps.global_batch(mesh, {
      "images": rng.standard_normal((args.batch, *size, 3)).astype(np.float32),
      "labels": (np.arange(args.batch) % 10).astype(np.int32)})
  config = steps.StepConfig(num_classes=10, compute_dtype=jnp.float32)
  runners = {}
  for name, pattern in FORMS.items():
    split = freeze.param_split(pattern, shapes, layout)
    step = steps.make_train_step(model, optimizer, ema, lambda s: 0.1, config, mesh,
                                 jax.random.key(1), split)
    holder = {"state": steps.init_state(model, optimizer, ema, jax.random.key(0), size, mesh,
                                        split)}

    def run(step=step, holder=holder):
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)

    run()  # compile
    runners[name] = run
  medians = alternate(runners, args.repeats)
  base = medians["all trained"]
  print(f"{args.model}, {args.image_size} px, batch {args.batch}, {jax.devices()[0].platform}; "
        f"{tuning}")
  print("| form | ms / step | all-trained time / this |\n| --- | --- | --- |")
  for name, seconds in medians.items():
    print(f"| {name} | {seconds * 1e3:.1f} | {base / seconds:.2f} |")


if __name__ == "__main__":
  main()
