"""An independent float64 NumPy rendering of the NFNet optimizer formulas
(Brock et al. 2021, arXiv:2102.06171), used as the oracle by the optimizer
tests. It deliberately shares no code with `nfnets_jax.optim`.
"""

import math

import numpy as np

CONV = "NFNet/~/nf_block_0/~/conv1"


def haiku_tree(rng: np.random.Generator, dtype=np.float32) -> dict:
  """A small Haiku-style NFNet parameter tree: HWIO convs, linears, vectors,
  scalars, and zero-initialised entries (where AGC's eps decides the bound)."""
  def normal(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)

  zeros = lambda *shape: np.zeros(shape, dtype)
  ones = lambda *shape: np.ones(shape, dtype)
  return {
      "NFNet/~/stem_conv0": {"w": normal(3, 3, 3, 8, scale=0.3), "gain": ones(8),
                             "bias": zeros(8)},
      CONV: {"w": normal(3, 3, 4, 8, scale=0.2), "gain": 1 + normal(8, scale=0.1),
             "bias": normal(8, scale=0.05)},
      # A zero-initialised conv kernel.
      "NFNet/~/nf_block_0/~/conv2": {"w": zeros(1, 1, 8, 16), "gain": ones(16),
                                     "bias": zeros(16)},
      "NFNet/~/nf_block_0": {"skip_gain": zeros()},
      "NFNet/~/nf_block_0/~/squeeze_excite/~/linear": {"w": normal(16, 8, scale=0.25),
                                                       "b": zeros(8)},
      "NFNet/~/nf_block_0/~/squeeze_excite/~/linear_1": {"w": normal(8, 16, scale=0.35),
                                                         "b": normal(16, scale=0.1)},
      "NFNet/~/linear": {"w": normal(16, 10, scale=0.01), "b": zeros(10)},
  }


def random_grads(rng: np.random.Generator, params: dict, dtype=np.float32) -> dict:
  """Gradients whose per-unit scale spans six orders of magnitude, so that some
  units are clipped and some are not."""
  out = {}
  for module, leaves in params.items():
    out[module] = {}
    for name, p in leaves.items():
      scale = 10.0 ** rng.uniform(-6, 0, size=p.shape[-1:] if p.ndim else ())
      out[module][name] = np.asarray(rng.standard_normal(p.shape) * scale, dtype)
  return out


def unit_norms(x: np.ndarray) -> np.ndarray:
  """Per-output-unit L2 norm, kept as a reduced array (keepdims)."""
  x = np.asarray(x, np.float64)
  if np.squeeze(x).ndim <= 1:
    return np.sqrt(np.sum(x * x)).reshape((1,) * x.ndim)
  axes = {2: (0,), 3: (0,), 4: (0, 1, 2)}[x.ndim]
  return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def agc(g: np.ndarray, p: np.ndarray, clipping: float, eps: float):
  """The published AGC step; returns (clipped gradient, units clipped, units)."""
  g = np.asarray(g, np.float64)
  g_norm, p_norm = unit_norms(g), unit_norms(p)
  max_norm = clipping * np.maximum(p_norm, eps)
  trigger = g_norm > max_norm
  clipped = g * (max_norm / np.maximum(g_norm, 1e-6))
  return np.where(trigger, clipped, g), int(trigger.sum()), trigger.size


def published_is_gain_or_bias(module: str, name: str) -> bool:
  return name in ("b", "scale", "offset") or "gain" in name or "bias" in name


def published_is_classifier(module: str, name: str) -> bool:
  return "linear" in module and "squeeze_excite" not in module


def warmup_cosine(step: int, peak: float, warmup: int, total: int, end: float = 0.0) -> float:
  """Linear warm-up from 0 to `peak` over `warmup` steps, then a half cosine
  from `peak` to `end` over the remaining `total - warmup` steps."""
  if step < warmup:
    return peak * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def nfnet_steps(params: dict, grads_seq: list, lr_at, *, momentum: float, nesterov: bool,
                weight_decay: float, clipping, eps: float,
                is_gain_or_bias=published_is_gain_or_bias,
                is_classifier=published_is_classifier,
                exclude_classifier_from_agc: bool = False):
  """Runs the published SGD-AGC rule for len(grads_seq) steps, in float64.

  Returns (final params, clip fraction of each step).
  """
  params = {m: {n: np.asarray(v, np.float64) for n, v in d.items()} for m, d in params.items()}
  buf = {m: {n: np.zeros_like(v) for n, v in d.items()} for m, d in params.items()}
  fractions = []
  for t, grads in enumerate(grads_seq):
    clipped_units = total_units = 0
    for module, leaves in params.items():
      for name, p in leaves.items():
        g = np.asarray(grads[module][name], np.float64)
        if is_gain_or_bias(module, name):
          use_agc, use_wd = True, False
          if exclude_classifier_from_agc and is_classifier(module, name):
            use_agc = False
        elif is_classifier(module, name):
          use_agc, use_wd = False, True
        else:
          use_agc, use_wd = True, True
        if use_agc and clipping is not None:
          g, c, n = agc(g, p, clipping, eps)
          clipped_units += c
          total_units += n
        if use_wd:
          g = g + weight_decay * p
        b = momentum * buf[module][name] + g
        buf[module][name] = b
        update = g + momentum * b if nesterov else b
        params[module][name] = p - lr_at(t) * update
    fractions.append(clipped_units / max(total_units, 1))
  return params, fractions
