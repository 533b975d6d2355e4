"""Optimizers of the NFNet paper as optax transforms (no TensorFlow needed).

* `adaptive_grad_clip`: unit-wise Adaptive Gradient Clipping (AGC), with an
  optional clip-fraction record (`agc_clip_fraction`).
* `nfnet_optimizer`: SGD + Nesterov momentum + weight decay + AGC, with the
  published parameter groups (`param_labels`, `is_gain_or_bias`, `is_classifier`).
* `nfnet_lr_schedule`: linear warm-up + cosine, learning rate scaled by batch/256
  (or not: `scale_by_batch=False`; `peak_learning_rate`).
* `sam_grad`: SAM gradients with a cheap, per-device ascent step.
* `params_ema`: EMA of the parameters with the TF1 warm-up.
"""

from nfnets_jax.optim.agc import (AdaptiveGradClipState, adaptive_grad_clip, agc_clip_fraction,
                                  unit_axes)
from nfnets_jax.optim.ema import EmaState, ParamsEma, ema_decay, params_ema
from nfnets_jax.optim.groups import (ParamPredicate, is_classifier, is_gain_or_bias, param_labels,
                                     split_path, stacked_layers)
from nfnets_jax.optim.optimizer import nfnet_optimizer
from nfnets_jax.optim.sam import ascent_batch_size, sam_grad, sam_perturbation
from nfnets_jax.optim.schedules import nfnet_lr_schedule, peak_learning_rate, scaled_learning_rate

__all__ = [
    "AdaptiveGradClipState", "adaptive_grad_clip", "agc_clip_fraction", "unit_axes",
    "EmaState", "ParamsEma", "ema_decay", "params_ema",
    "ParamPredicate", "is_classifier", "is_gain_or_bias", "param_labels", "split_path",
    "stacked_layers",
    "nfnet_optimizer",
    "ascent_batch_size", "sam_grad", "sam_perturbation",
    "nfnet_lr_schedule", "peak_learning_rate", "scaled_learning_rate",
]
