"""The published ImageNet NFNets as NNX modules, over the project's own loader."""

from typing import Any, Optional

from flax import nnx

from nfnets_jax.nnx.model import Model
# The one place the NNX side reaches the published weights (catalogue, download,
# checksum, cache): the weights package.
from nfnets_jax.weights import pretrained as load_published
from nfnets_jax.weights import published as catalogue


def pretrained(name: str, *, rngs: Optional[nnx.Rngs] = None, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, **fetch_kwargs: Any) -> Model:
  """`name` ('nfnet:F0' .. 'nfnet:F6', or 'published:F0' ..) with its published ImageNet
  weights (1000 classes).

  The weights are downloaded once, verified and cached as for
  `weights.pretrained` (whose `fetch_kwargs` pass through: `cache_dir`,
  `offline`, ...). `rngs` serves stochastic depth and dropout when the module
  is trained (fine-tuning); inference needs none. `conv_impl` and
  `block_loop` fix how the model is lowered, as for `models.transform`.
  """
  model_name = catalogue.model_name(catalogue.variant_of(name))
  _, params = load_published(model_name, conv_impl=conv_impl, block_loop=block_loop,
                             **fetch_kwargs)
  lowering = {key: value for key, value in (("conv_impl", conv_impl), ("block_loop", block_loop))
              if value is not None}
  # The loader has checked the tree against the network, and stacked it as the model does.
  return Model(model_name, params, num_classes=1000, model_kwargs=lowering, rngs=rngs)
