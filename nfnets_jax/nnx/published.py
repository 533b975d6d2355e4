"""Trained weights by name as NNX modules, over the project's own loaders."""

from typing import Any, Optional

from flax import nnx

from nfnets_jax.nnx.model import Model
# The one place the NNX side reaches trained weights (catalogues, download, checksum,
# cache): the weights package.
from nfnets_jax.weights import pretrained as load_pretrained
from nfnets_jax.weights import published, timm_hub


def pretrained(name: str, *, rngs: Optional[nnx.Rngs] = None, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, **fetch_kwargs: Any) -> Model:
  """`name` with its trained ImageNet weights (1000 classes): the published NFNets
  ('nfnet:F0' .. 'nfnet:F6', or 'published:F0' ..) or timm's ('timm:eca_nfnet_l0', ...).

  The weights are downloaded once, verified and cached by `weights.pretrained`
  (whose `fetch_kwargs` pass through), which also checks them against the
  network. `rngs` serves stochastic depth and dropout when the module is
  trained (fine-tuning); inference needs none. `conv_impl` and `block_loop`
  fix how the model is lowered, as for `models.transform`.
  """
  model_name = _model_name(name)
  _, params = load_pretrained(name, conv_impl=conv_impl, block_loop=block_loop, **fetch_kwargs)
  lowering = {key: value for key, value in (("conv_impl", conv_impl), ("block_loop", block_loop))
              if value is not None}
  # Checked against the network by the loader, and in the model's own layout already.
  return Model(model_name, params, num_classes=1000, model_kwargs=lowering, rngs=rngs)


def _model_name(name: str) -> str:
  """The registry name of the network that trained weights `name` fit (the loader's catalogues)."""
  if timm_hub.is_hub_name(name):
    return timm_hub.model_name(timm_hub.lookup(name))
  return published.model_name(published.variant_of(name))
