"""Every 'timm:<name>' model against timm's own: parameters, logits, both conversions.

For each entry of timm's `model_cfgs` (or the names given): timm's model with
every parameter randomised (gains, SkipInit gains and biases too, so that no
residual branch is switched off), converted to ours (`from_timm`), run
on the same random images in float32 inference mode on CPU; the table gives

* params: ours (`models.count_params`) and timm's, and whether they are equal;
* logits: max |ours - timm| / max |timm| (the issue's bar: below 1e-4);
* back: whether `to_timm(from_timm(sd))` gives timm's arrays exactly;
* seconds for the row.

Needs the `peers` extra (torch, timm). Usage:

  python benchmarks/timm_family_parity.py                     # every model at 64 px
  python benchmarks/timm_family_parity.py --size 96 eca_nfnet_l0 nf_regnet_b1
"""

import argparse
import sys
import time

# timm first: importing torch after TensorFlow/JAX plugins can crash (see tests/conftest.py).
import timm  # noqa: I001
import torch
from timm.models import nfnet as timm_nfnet

import jax
import numpy as np

from nfnets_jax import models
from nfnets_jax.weights import timm_parity

TOLERANCE = 1e-4


def check(name: str, size: int, batch: int = 2) -> dict:
  start = time.perf_counter()
  model = timm_parity.randomise(timm.create_model(name).eval(), seed=0)
  timm_params = sum(p.numel() for p in model.parameters())
  images = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
  parity = timm_parity.compare(model, name, images)
  return {"name": name, "ours": models.count_params(f"timm:{name}"), "timm": timm_params,
          "err": parity.error, "back": not parity.mismatched,
          "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="timm names (default: every model_cfgs entry)")
  parser.add_argument("--size", type=int, default=64, help="image size (default 64)")
  args = parser.parse_args(argv)
  names = args.names or list(timm_nfnet.model_cfgs)
  print(f"timm {timm.__version__}, torch {torch.__version__}, jax {jax.__version__}; "
        f"{args.size} px, batch 2, float32, CPU, inference mode")
  print(f"| {'model':<16} | {'params (ours)':>13} | {'params (timm)':>13} | equal | "
        f"logits rel. err | back exact | s |")
  print(f"|{'-' * 18}|{'-' * 15}|{'-' * 15}|-------|-----------------|------------|---|")
  failed = []
  for name in names:
    row = check(name, args.size)
    ok = row["ours"] == row["timm"] and row["err"] < TOLERANCE and row["back"]
    if not ok:
      failed.append(name)
    print(f"| {name:<16} | {row['ours']:>13,} | {row['timm']:>13,} | "
          f"{'yes' if row['ours'] == row['timm'] else 'NO':>5} | {row['err']:>15.2e} | "
          f"{'yes' if row['back'] else 'NO':>10} | {row['seconds']:.0f} |", flush=True)
  print(f"{len(names) - len(failed)}/{len(names)} agree"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
