"""The published ImageNet NFNets as NNX modules, over the project's own loader."""

from typing import Any, Optional

from flax import nnx

# The one place the NNX side reaches the published weights (download, checksum, cache).
from nfnets_jax.weights import pretrained as load_published
from nfnets_jax.nnx.model import Model, from_haiku


def pretrained(name: str, *, rngs: Optional[nnx.Rngs] = None, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, **fetch_kwargs: Any) -> Model:
  """`name` ('nfnet:F0' .. 'nfnet:F6') with its published ImageNet weights (1000 classes).

  The weights are downloaded once, verified and cached as for
  `weights.pretrained` (whose `fetch_kwargs` pass through: `cache_dir`,
  `offline`, ...). `rngs` serves stochastic depth and dropout when the module
  is trained (fine-tuning); inference needs none. `conv_impl` and
  `block_loop` fix how the model is lowered, as for `models.transform`.
  """
  _, params = load_published(name, conv_impl=conv_impl, block_loop=block_loop, **fetch_kwargs)
  lowering = {key: value for key, value in (("conv_impl", conv_impl), ("block_loop", block_loop))
              if value is not None}
  return from_haiku(name, params, rngs=rngs, num_classes=1000, **lowering)
