"""A timm model against its 'timm:<name>' conversion: the same logits, the same arrays back.

Needs PyTorch and timm (the `peers` extra), which only the caller imports: it
hands in timm's module. Used by the agreement tests (tests/test_timm_family.py)
and the whole-family table (benchmarks/timm_family_parity.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from nfnets_jax import models
from nfnets_jax.weights import timm


def randomise(model: Any, seed: int) -> Any:
  """Randomises timm's `model` in place, gains, SkipInit gains and biases too, and returns it.

  At timm's initialisation some gains are zero (each block's last one) or one, so a
  conversion that misplaced them would still agree; random ones switch every branch on.
  """
  import torch  # the caller's timm model is a torch module

  torch.manual_seed(seed)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("skipinit_gain"):
        p.copy_(0.5 + torch.rand(p.shape))
      elif key.endswith(".gain"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape))
      elif key.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape))
  return model


@dataclasses.dataclass(frozen=True)
class Parity:
  """`error`: max |ours - timm| / max |timm| over the logits; `mismatched`: the state dict
  entries `to_timm(from_timm(sd))` does not give back exactly (missing, extra or changed)."""
  error: float
  mismatched: tuple[str, ...]


def compare(model: Any, name: str, images: np.ndarray) -> Parity:
  """timm's `model` (eval mode) and 'timm:<name>' converted from its state dict, on NHWC
  float32 `images`, in inference mode with XLA's own convolutions."""
  import torch  # the caller's timm model is a torch module

  sd = {key: value.numpy() for key, value in model.state_dict().items()}
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  params = timm.from_timm(sd, f"timm:{name}")
  net = models.transform(f"timm:{name}", 1000, conv_impl="xla")
  apply = jax.jit(lambda p, x: net.apply(p, None, x, is_training=False)["logits"])
  logits = np.asarray(apply(params, images))
  back = timm.to_timm(params, f"timm:{name}")
  mismatched = sorted(set(back) ^ set(sd))
  mismatched += [key for key in sd if key in back and not np.array_equal(back[key], sd[key])]
  return Parity(float(np.abs(logits - expected).max() / np.abs(expected).max()),
                tuple(mismatched))
