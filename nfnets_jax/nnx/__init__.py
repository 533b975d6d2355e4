"""NFNets as Flax NNX modules (the `flax` extra: `pip install nfnets-jax[flax]`).

Every registered model (`'nfnet:F0'`, `'nf_regnet:B0'`, `'timm:eca_nfnet_l0'`, ...)
and its weights as an `nnx.Module` computed by the Haiku model itself, so the
network exists once (`nfnets_jax.models`):

* `create(name, num_classes, *, rngs, **model_kwargs)`: initialised as the
  Haiku model initialises;
* `from_haiku(name, params, **model_kwargs)` / `to_haiku(module)`: the same
  parameters both ways (the published `{module_path: {name: array}}` tree);
* `pretrained(name)`: trained weights by name (the published NFNets, timm's);
* `module(images, is_training=False)` -> float32 logits.

The module's parameter paths are the Haiku ones under `params/`, so
`nnx.Optimizer(module, optim.nfnet_optimizer(...), wrt=nnx.Param)` keeps the
published groups (no weight decay on gains and biases, no AGC on the
classifier); `CLASSIFIER` and `BACKBONE` filter them for fine-tuning.
"""

from nfnets_jax.nnx.filters import BACKBONE, CLASSIFIER
from nfnets_jax.nnx.model import Model, create, from_haiku, to_haiku
from nfnets_jax.nnx.published import pretrained

__all__ = ["Model", "create", "from_haiku", "to_haiku", "pretrained", "CLASSIFIER", "BACKBONE"]
