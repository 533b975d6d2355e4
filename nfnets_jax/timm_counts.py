"""timm's own size and cost of its models, measured by PyTorch, for `report` to compare with.

For a timm model name and an image size: the parameters as the sum of `numel`
over timm's `model.parameters()`, and the multiply-adds of one forward pass
as PyTorch's `torch.utils.flop_counter.FlopCounterMode` counts them, halved
(it counts 2 FLOPs per multiply-add of a convolution or matrix product, and
nothing else: no pooling, activations, biases, weight standardisation or
gating products). The model is built on PyTorch's `meta` device and run on a
`meta` tensor: only shapes flow, so the largest model costs no memory and a
second or two.

The measuring runs in a child process (`python -m nfnets_jax.timm_counts
NAME:SIZE ...`, JSON on stdout) that imports timm first and never JAX or
TensorFlow: importing timm after TensorFlow crashes the interpreter (see
tests/conftest.py), and the report has JAX loaded already. This module's
top level imports only the standard library; torch and timm are the `peers`
extra, and without them `missing_peers()` says so and nothing is measured.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from typing import Optional, Sequence

#: The packages the measurement needs (the `peers` extra).
PEER_PACKAGES = ("torch", "timm")
#: How long the child may take for all requested models (PyTorch's import dominates).
CHILD_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class TimmCount:
  """timm's parameters of `model` and its multiply-adds at `image_size` px, with
  FlopCounterMode's FLOPs per operator (2 per multiply-add) for the record, and
  the train and test resolutions of timm's default config (`input_size`,
  `test_input_size`, or `input_size` where it has none)."""
  model: str
  image_size: int
  params: int
  macs: int
  flops_by_op: dict[str, int]
  timm_train_size: int
  timm_test_size: int


def missing_peers() -> Optional[str]:
  """None when torch and timm can be imported; otherwise why the counts cannot be measured."""
  missing = [name for name in PEER_PACKAGES if importlib.util.find_spec(name) is None]
  if not missing:
    return None
  return (f"{' and '.join(missing)} not installed (pip install 'nfnets-jax[peers]')")


def parse_request(text: str) -> tuple[str, int]:
  """'eca_nfnet_l0:288' -> ('eca_nfnet_l0', 288), or a ValueError naming the text."""
  name, sep, size = text.rpartition(":")
  if not sep or not name or not size.isdigit() or int(size) < 1:
    raise ValueError(f"Bad request {text!r}: expected NAME:SIZE with a positive pixel size, "
                     "e.g. eca_nfnet_l0:288.")
  return name, int(size)


def measure(requests: Sequence[tuple[str, int]]) -> list[TimmCount]:
  """Counts each (timm name, image size) in this process, which must not have imported
  TensorFlow before (timm is imported here, then torch)."""
  import timm  # pylint: disable=import-outside-toplevel  (the peers extra, first)
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel

  counts, models = [], {}
  for name, size in requests:
    if name not in models:
      if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}.")
      with torch.device("meta"):
        models[name] = timm.create_model(name, pretrained=False).eval()
    model = models[name]
    params = sum(p.numel() for p in model.parameters())
    image = torch.empty(1, 3, size, size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
      model(image)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    config = model.pretrained_cfg
    train_size = config["input_size"][-1]
    test_size = (config.get("test_input_size") or config["input_size"])[-1]
    counts.append(TimmCount(name, size, int(params), counter.get_total_flops() // 2, by_op,
                            train_size, test_size))
  return counts


def measure_in_child(requests: Sequence[tuple[str, int]]) -> list[TimmCount]:
  """`measure(requests)` in a fresh Python process (timm imported first there).

  A child that fails raises a ChildProcessError (an OSError: the CLIs' one-line
  `error:`) carrying the end of its stderr.
  """
  if not requests:
    return []
  argv = [sys.executable, "-m", "nfnets_jax.timm_counts",
          *(f"{name}:{size}" for name, size in requests)]
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                        check=False)
  if proc.returncode != 0:
    raise ChildProcessError(f"Measuring timm's counts failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-2000:]}")
  return [TimmCount(**row) for row in json.loads(proc.stdout)]


def main(argv: Sequence[str]) -> int:
  """The child: NAME:SIZE arguments in, a JSON list of `TimmCount`s out; 2 on bad input."""
  try:
    requests = [parse_request(text) for text in argv[1:]]
    if not requests:
      raise ValueError("No request given: expected NAME:SIZE arguments, e.g. eca_nfnet_l0:288.")
    counts = measure(requests)
  except ValueError as err:
    print(f"usage error: {err}", file=sys.stderr)
    return 2
  print(json.dumps([dataclasses.asdict(count) for count in counts]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
