"""NFNet throughput: nfnets-jax vs timm's PyTorch NFNet on the same machine, same run.

Measures, alternating ours and timm's round by round so that drifting machine
load hits both alike:

* train step images/s: forward + backward + SGD-Nesterov with weight decay +
  AGC (clipping 0.01), in float32 and bfloat16 (ours: float32 master weights,
  bfloat16 compute; timm: `torch.autocast(bfloat16)`);
* inference images/s (`is_training=False` / `model.eval()` under
  `torch.inference_mode`), float32;
* ours' compile time per step function, and the first call of timm's;
* timm run eagerly and, with `--timm-kinds eager,compile` (the default with
  `--gpu`), under `torch.compile` (inductor; on CPU it needs a C++ compiler,
  and its first call can take minutes: docs/performance.md). A kind that
  fails to build or on its first call is reported and left out; the other
  measurements go on;
* with `--memory`, peak resident memory of two train steps of each, each in a
  fresh child process (a shared process would only show the larger), above
  the child's size once both frameworks are imported.

The process runs with the settings our command-line tools apply on CPU
(`nfnets_jax.cli.cpu_tuning`), which the timm model in the same process shares;
`--cpu-tuning=off` measures JAX's and glibc's defaults instead.

Both models are NFNet-F0 by default (timm `dm_nfnet_f0`, the published
architecture; `--variant` for others, and `--variant eca_nfnet_l0` for timm's
models, ours as `timm:eca_nfnet_l0`) with the same dropout (0.2) and stochastic
depth (0.1). Our train step is written over the public API (`models.transform`
+ `nfnet_optimizer`), so its state is in the model's own layout (identical
blocks scanned and their parameters stacked, NFNet-F1 and deeper); inference
runs from the published parameter tree, as the evaluation and classification
tools load it.
Ratios are ours/timm throughput (>1: we are faster). Needs the `peers` extra (torch, timm).

Usage:
  python benchmarks/bench_vs_timm.py                      # the README's CPU table
  python benchmarks/bench_vs_timm.py --variant F1 --train-size 128 --infer-size 256
  python benchmarks/bench_vs_timm.py --only train32 --cpu-tuning=off   # untuned
  python benchmarks/bench_vs_timm.py --gpu                # F0 batch 32 at 192 px, bf16
  python benchmarks/bench_vs_timm.py --only train32,infer --timm-kinds eager,compile
"""

import argparse
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Sequence

# timm first: importing torch after TensorFlow/JAX plugins can crash (see tests/conftest.py).
import timm  # noqa: I001
import torch
import torch.nn.functional as F
from timm.utils import adaptive_clip_grad

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from nfnets_jax.models import registry  # noqa: E402
from nfnets_jax.optim import nfnet_optimizer  # noqa: E402
from timing import add_cpu_tuning_flag, alternate, apply_cpu_tuning  # noqa: E402  (benchmarks/timing.py)

NUM_CLASSES = 1000
DROP_RATE, STOCHDEPTH_RATE = 0.2, 0.1
LR, MOMENTUM, WEIGHT_DECAY, CLIPPING = 0.1, 0.9, 2e-5, 0.01
PAPER_V100_MS = 56.7  # F0 train step, batch 32/device at 192 px (paper, Table 1 context)


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="F0",
                      help="F0..F6 (ours nfnet:F0 vs timm's dm_nfnet_f0), or a timm model name "
                           "(ours timm:<name> vs timm's, e.g. eca_nfnet_l0)")
  parser.add_argument("--train-batch", type=int, default=8)
  parser.add_argument("--train-size", type=int, default=128)
  parser.add_argument("--infer-batch", type=int, default=8)
  parser.add_argument("--infer-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
  parser.add_argument("--only", default="train32,train16,infer",
                      help="comma-separated subset of train32, train16, infer")
  parser.add_argument("--memory", action="store_true",
                      help="also measure peak RSS of one float32 train step per framework")
  parser.add_argument("--gpu", action="store_true",
                      help="GPU mode: batch 32 at 192 px bf16 train step on cuda, timm eager "
                           "and torch.compile, vs the paper's V100 figure")
  parser.add_argument("--timm-kinds", default=None,
                      help="comma-separated timm contenders: eager, compile (torch.compile); "
                           "default eager on CPU, eager,compile with --gpu")
  add_cpu_tuning_flag(parser)
  parser.add_argument("--child", choices=("ours", "timm"), help=argparse.SUPPRESS)
  return parser.parse_args()


class Ours:
  """Our train/inference steps, jitted, with donated state."""

  def __init__(self, variant: str, dtype):
    self.dtype = dtype
    self.model = registry.transform(our_name(variant), NUM_CLASSES, drop_rate=DROP_RATE,
                                    stochdepth_rate=STOCHDEPTH_RATE)
    # Checkpoint files' tree, which inference is given (the identity for F0).
    self.layout = registry.stacked_layout(our_name(variant), NUM_CLASSES)
    self.opt = nfnet_optimizer(LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                               clipping=CLIPPING)
    self.compile_s = {}

  def init(self, size: int):
    """Fresh parameters in the published tree."""
    return self.layout.to_published(self._init(size))

  def _init(self, size: int):
    key = jax.random.key(0)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.jit(self.model.init, static_argnames="is_training")(key, x, is_training=True)

  def train_state(self, size: int):
    """(parameters, optimizer state), in the model's own layout."""
    params = self._init(size)
    return params, self.opt.init(params)

  def train_step(self):
    def loss_fn(params, images, labels, key):
      logits = self.model.apply(params, key, images.astype(self.dtype),
                                is_training=True)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, opt_state, images, labels, key):
      grads = jax.grad(loss_fn)(params, images, labels, key)
      updates, opt_state = self.opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))

  def infer_step(self):
    return jax.jit(lambda params, images: self.model.apply(params, None, images,
                                                           is_training=False)["logits"])


def our_name(variant: str) -> str:
  """'F0' -> 'nfnet:F0'; a timm name -> 'timm:<name>'."""
  return f"nfnet:{variant}" if variant.startswith("F") else f"timm:{variant}"


def timm_name(variant: str) -> str:
  """'F0' -> 'dm_nfnet_f0' (the published architecture); a timm name stays itself."""
  return f"dm_nfnet_{variant.lower()}" if variant.startswith("F") else variant


def timm_model(variant: str, device: str):
  model = timm.create_model(timm_name(variant), pretrained=False,
                            drop_rate=DROP_RATE, drop_path_rate=STOCHDEPTH_RATE)
  return model.to(device)


def timm_train_step(model, device: str, bf16: bool, compiled: bool = False):
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                        weight_decay=WEIGHT_DECAY)
  forward = torch.compile(model) if compiled else model
  model.train()

  def step(images, labels):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    adaptive_clip_grad(model.parameters(), clip_factor=CLIPPING)
    opt.step()
    return loss

  return step


def sync(device: str):
  if device == "cuda":
    torch.cuda.synchronize()


def timm_contenders(build: Callable[[str], Callable[[], None]], kinds: Sequence[str]
                    ) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
  """Builds and first-calls one timm contender per kind ("eager", "compile").

  `build(kind)` returns a zero-argument function that runs one step and
  waits for it. Its first call (torch.compile's compilation) is timed apart.
  A kind that raises while building or in that call is reported and left out,
  so that a peer which cannot run here (no C++ compiler or Triton for
  inductor, say) does not throw away the measurements of the others.
  """
  fns, first_call = {}, {}
  for kind in kinds:
    try:
      fn = build(kind)
      start = time.perf_counter()
      fn()
      first_call[kind] = time.perf_counter() - start
    except Exception as e:  # pylint: disable=broad-except  (any failure of a peer)
      message = (str(e).strip().splitlines() or [""])[0][:300]
      print(f"  timm {kind}: left out, it failed: {type(e).__name__}: {message}")
      continue
    fns[f"timm {kind}"] = fn
  return fns, first_call


def print_timm_rows(first_call: dict[str, float], med: dict[str, float], batch: int,
                    unit: str) -> None:
  """One line per timm contender that ran (the kinds in `first_call`): its
  time, images/s, first call, ratio."""
  for kind, first in first_call.items():
    name = f"timm {kind}"
    print(f"  {name:<12} {1e3 * med[name]:9.1f} ms/{unit} {batch / med[name]:8.2f} img/s "
          f"(first call {first:.1f} s)   ratio ours/timm {med[name] / med['ours']:.2f}")
  if not first_call:
    print("  no timm contender ran: no ratio")


def _status_mib(field: str) -> float:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB. Unlike
  getrusage's ru_maxrss, which Linux carries across fork and exec (a child
  would report its parent's peak), VmHWM starts afresh in each program."""
  with open("/proc/self/status", encoding="ascii") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(args: argparse.Namespace) -> None:
  """One float32 train step of one framework; prints its peak RSS above the
  process's resident size after imports, in MiB (both frameworks' libraries are
  loaded in every child, so only the step's own memory is compared)."""
  size, batch = args.train_size, args.train_batch
  baseline = _status_mib("VmRSS")
  if args.child == "ours":
    ours = Ours(args.variant, jnp.float32)
    params, opt_state = ours.train_state(size)
    step = ours.train_step()
    images = jnp.zeros((batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    for i in range(2):
      params, opt_state = step(params, opt_state, images, labels, jax.random.key(i))
    jax.block_until_ready(params)
  else:
    torch.set_num_threads(os.cpu_count())
    model = timm_model(args.variant, "cpu")
    step = timm_train_step(model, "cpu", bf16=False)
    images = torch.zeros(batch, 3, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    for _ in range(2):
      step(images, labels)
  print(_status_mib("VmHWM") - baseline)


def peak_memory(args: argparse.Namespace) -> dict[str, float]:
  result = {}
  for who in ("ours", "timm"):
    cmd = [sys.executable, __file__, "--child", who, "--variant", args.variant,
           "--train-batch", str(args.train_batch), "--train-size", str(args.train_size),
           "--cpu-tuning", args.cpu_tuning]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result[who] = float(out.strip().splitlines()[-1])
  return result


def bench_train(args, dtype_name: str, device: str, timm_kinds: Sequence[str]) -> None:
  bf16 = dtype_name == "bfloat16"
  size, batch = args.train_size, args.train_batch
  ours = Ours(args.variant, jnp.bfloat16 if bf16 else jnp.float32)
  state = list(ours.train_state(size))
  step = ours.train_step()
  key = jax.random.key(1)
  images = jax.random.normal(key, (batch, size, size, 3))
  labels = jnp.arange(batch) % NUM_CLASSES
  counter = [0]

  def run_ours():
    counter[0] += 1
    state[:] = step(*state, images, labels, jax.random.fold_in(key, counter[0]))
    jax.block_until_ready(state)

  start = time.perf_counter()
  run_ours()
  compile_s = time.perf_counter() - start

  t_images = torch.randn(batch, 3, size, size, device=device)
  t_labels = torch.arange(batch, device=device) % NUM_CLASSES

  def build(kind: str) -> Callable[[], None]:
    t_step = timm_train_step(timm_model(args.variant, device), device, bf16, kind == "compile")

    def run_timm():
      t_step(t_images, t_labels)
      sync(device)
    return run_timm

  timm_fns, first_call = timm_contenders(build, timm_kinds)
  med = alternate({"ours": run_ours, **timm_fns}, args.repeats)
  print(f"train step {args.variant} {dtype_name}, batch {batch} at {size}px "
        f"(fwd+bwd+SGD-Nesterov+wd+AGC):")
  print(f"  ours         {1e3 * med['ours']:9.1f} ms/step {batch / med['ours']:8.2f} img/s "
        f"(compile {compile_s:.1f} s)")
  print_timm_rows(first_call, med, batch, "step")
  if args.gpu:
    print(f"  paper V100 (TPU-style recipe, batch 32 at 192 px): {PAPER_V100_MS} ms/step; "
          f"ours/paper speed ratio {PAPER_V100_MS / (1e3 * med['ours']):.2f}")


def bench_infer(args, device: str, timm_kinds: Sequence[str]) -> None:
  size, batch = args.infer_size, args.infer_batch
  ours = Ours(args.variant, jnp.float32)
  params = ours.init(size)  # the published tree, as the inference tools load it
  step = ours.infer_step()
  images = jax.random.normal(jax.random.key(2), (batch, size, size, 3))
  start = time.perf_counter()
  jax.block_until_ready(step(params, images))
  compile_s = time.perf_counter() - start
  t_images = torch.randn(batch, 3, size, size, device=device)

  def build(kind: str) -> Callable[[], None]:
    model = timm_model(args.variant, device).eval()
    forward = torch.compile(model) if kind == "compile" else model

    def run_timm():
      with torch.inference_mode():
        forward(t_images)
      sync(device)
    return run_timm

  timm_fns, first_call = timm_contenders(build, timm_kinds)
  med = alternate({"ours": lambda: jax.block_until_ready(step(params, images)), **timm_fns},
                  args.repeats)
  print(f"inference {args.variant} float32, batch {batch} at {size}px:")
  print(f"  ours         {1e3 * med['ours']:9.1f} ms/batch {batch / med['ours']:8.2f} img/s "
        f"(compile {compile_s:.1f} s)")
  print_timm_rows(first_call, med, batch, "batch")


def comma_list(flag: str, text: str, allowed: Sequence[str]) -> list[str]:
  """The non-empty items of a comma-separated flag value; exits naming any
  item not in `allowed`, and the allowed ones."""
  items = [item for item in text.split(",") if item]
  unknown = sorted(set(items) - set(allowed))
  if unknown or not items:
    what = f"unknown {unknown}" if unknown else "no item"
    sys.exit(f"{flag}: {what} in {text!r}; choose from {', '.join(allowed)}.")
  return items


def main() -> None:
  args = parse_args()
  tuning = apply_cpu_tuning(args)  # before any JAX work
  if args.child:
    run_child(args)
    return
  sys.stdout.reconfigure(line_buffering=True)
  device = "cuda" if args.gpu else "cpu"
  if args.gpu:
    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
      sys.exit("--gpu needs a CUDA GPU visible to both torch and JAX (jax[cuda]).")
    args.train_batch, args.train_size, args.only = 32, 192, "train16"
  else:
    torch.set_num_threads(os.cpu_count())
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), timm {timm.__version__}")
  print(tuning)
  wanted = set(comma_list("--only", args.only, ("train32", "train16", "infer")))
  timm_kinds = comma_list("--timm-kinds",
                          args.timm_kinds or ("eager,compile" if args.gpu else "eager"),
                          ("eager", "compile"))
  if "train32" in wanted:
    bench_train(args, "float32", device, timm_kinds)
  if "train16" in wanted:
    bench_train(args, "bfloat16", device, timm_kinds)
  if "infer" in wanted:
    bench_infer(args, device, timm_kinds)
  if args.memory:
    mem = peak_memory(args)
    print(f"peak memory of two float32 train steps in a fresh process (above its size after "
          f"imports): ours {mem['ours']:.0f} MiB, timm {mem['timm']:.0f} MiB "
          f"(ratio timm/ours {mem['timm'] / mem['ours']:.2f})")
  print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
