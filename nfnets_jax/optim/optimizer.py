"""The NFNet optimizer: SGD with Nesterov momentum, weight decay and AGC.

Brock et al. 2021 (arXiv:2102.06171) train NFNets with, per parameter and in
this order: unit-wise adaptive gradient clipping, coupled weight decay
`g + wd * w`, then SGD with (Nesterov) momentum `buf = m * buf + g`, update
`g + m * buf` (Nesterov) or `buf`, step `-lr * update`. Which parameters get
AGC and which get weight decay is decided by `groups.py`.

Each piece is an optax transform (AGC and weight decay masked by group,
`optax.trace`, `optax.scale_by_learning_rate`), so the result is one
`optax.GradientTransformation` that composes with any other.
"""

from typing import Any, Callable, Optional

import optax

from nfnets_jax.optim import groups
from nfnets_jax.optim._checks import check_number
from nfnets_jax.optim.agc import adaptive_grad_clip
from nfnets_jax.optim.groups import ParamPredicate


def _check(name: str, value: Any, ok, valid: str) -> None:
  check_number("nfnet_optimizer", name, value, ok, valid)


def nfnet_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 2e-5,
    clipping: Optional[float] = 0.01,
    eps: float = 1e-3,
    is_gain_or_bias: Optional[ParamPredicate] = None,
    is_classifier: Optional[ParamPredicate] = None,
    exclude_classifier_from_agc: bool = False,
    record_clip_fraction: bool = False,
    accumulator_dtype: Optional[Any] = None,
    stacked_axes: Optional[Callable[[str, str], int]] = None,
) -> optax.GradientTransformation:
  """SGD + (Nesterov) momentum + weight decay + AGC, grouped as published.

  Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization", arXiv:2102.06171.

  Groups (see `groups.py`; each predicate takes `(module_path, name)`):
  gains/biases (`is_gain_or_bias`) get AGC but no weight decay; other
  parameters of the classifier (`is_classifier`) get weight decay but no AGC;
  everything else gets both.

  Args:
    learning_rate: a float, or an optax schedule of the step count (e.g.
      `nfnet_lr_schedule`); updates are `-learning_rate * ...`.
    momentum: momentum coefficient `m` in `buf = m * buf + g`; 0 disables the
      momentum buffer.
    nesterov: the update is `g + m * buf` (True) or `buf` (False).
    weight_decay: coupled L2 coefficient (`g + weight_decay * param`).
    clipping: AGC threshold (see `adaptive_grad_clip`); None disables AGC.
    eps: AGC's floor on parameter norms.
    is_gain_or_bias: predicate for the no-weight-decay group; None is the
      published rule, `groups.is_gain_or_bias`.
    is_classifier: predicate for the no-AGC group (gains/biases excepted); None
      is the published rule, `groups.is_classifier`. (None rather than the
      functions as defaults so that `optax.inject_hyperparams(nfnet_optimizer)`
      works; it takes any callable argument for a schedule, so custom
      predicates must then be listed in its `static_args`.)
    exclude_classifier_from_agc: also skip AGC for the classifier's gains and
      biases (the published rule clips the classifier's bias).
    record_clip_fraction: keep the fraction of AGC units clipped at each step in
      the state; read it with `agc_clip_fraction(opt_state)`.
    accumulator_dtype: dtype of the momentum buffer (default: the parameters').
    stacked_axes: for parameter trees holding stacked layers, the number of
      leading axes of each parameter that index its copies, as a function of
      `(module_path, name)`; None is `groups.stacked_layers` (see
      `adaptive_grad_clip`), which knows this project's models. Under
      `optax.inject_hyperparams`, list it in `static_args`.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.
  """
  if not callable(learning_rate):
    _check("learning_rate", learning_rate, lambda v: v > 0,
           "a number > 0 or an optax schedule (a callable of the step)")
  _check("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("weight_decay", weight_decay, lambda v: v >= 0, "a number >= 0")
  if clipping is not None:
    _check("clipping", clipping, lambda v: v > 0, "a number > 0, or None to disable AGC")
  _check("eps", eps, lambda v: v > 0, "a number > 0")
  if is_gain_or_bias is None:
    is_gain_or_bias = groups.is_gain_or_bias
  if is_classifier is None:
    is_classifier = groups.is_classifier
  for name, fn in (("is_gain_or_bias", is_gain_or_bias), ("is_classifier", is_classifier)):
    if not callable(fn):
      raise ValueError(
          f"nfnet_optimizer: {name} must be a callable (module_path, name) -> bool, got {fn!r}.")
  if record_clip_fraction and clipping is None:
    raise ValueError("nfnet_optimizer: record_clip_fraction=True needs AGC, but clipping=None.")

  def agc_mask(tree):
    def clipped(module: str, name: str) -> bool:
      if is_gain_or_bias(module, name):
        return not (exclude_classifier_from_agc and is_classifier(module, name))
      return not is_classifier(module, name)
    return groups.map_params(clipped, tree)

  def decay_mask(tree):
    return groups.map_params(lambda module, name: not is_gain_or_bias(module, name), tree)

  steps = []
  if clipping is not None:
    steps.append(optax.masked(
        adaptive_grad_clip(clipping, eps, record_clip_fraction=record_clip_fraction,
                           stacked_axes=stacked_axes), agc_mask))
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    steps.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  if not (isinstance(momentum, (int, float)) and momentum == 0):
    steps.append(optax.trace(decay=momentum, nesterov=nesterov,
                             accumulator_dtype=accumulator_dtype))
  steps.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*steps)
