"""NNX filters for the parameter groups of `nfnets_jax.optim.groups`.

A filter picks variables by their path in the module (`('params',
'NFNet/~/linear', 'w')`); these apply the optimizer's own rule
(`groups.is_classifier`) to that path, so "the head" means the same
parameters in NNX as in the Haiku trainer. Use them as `wrt=` of
`nnx.Optimizer` and in `nnx.DiffState` to train or freeze parts of a model.
"""

from typing import Any

from flax import nnx

from nfnets_jax.optim import groups


def _in_classifier(path: tuple[Any, ...], value: Any) -> bool:
  del value
  return groups.is_classifier(*groups.split_path(path))


#: The final classifier's parameters (weight and bias): a linear probe trains these.
CLASSIFIER = nnx.All(nnx.Param, _in_classifier)
#: Every other parameter: the backbone a linear probe keeps frozen.
BACKBONE = nnx.All(nnx.Param, nnx.Not(_in_classifier))
