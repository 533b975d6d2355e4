"""Every way parameters come in and go out, behind one face.

* `load_params(path)`: a parameter tree from this project's `.npz`, a published
  `*_haiku.npz` pickle (restricted unpickler), an orbax directory, a training
  workdir or step, `'published:F0'` .. `'published:F6'`, or timm's trained
  weights by name (`'timm:eca_nfnet_l0'`, from the Hugging Face hub).
* `load_meta(path)`: the record a training run saved with its weights.
* `load_model(path)`: the parameters and the network they fit (`LoadedModel`),
  checked once.
* `pretrained('nfnet:F0')`, `pretrained('timm:eca_nfnet_l0')`: `(model, params)`
  of the published ImageNet weights (or timm's), downloaded once and verified.
* `save_params_npz`, `save_params_orbax`: this project's files.

Behind it: `formats` (files), `workdir` (the training-run layout),
`safe_pickle`, `published` and `download` (the published catalogue and its
verified download), `timm` (timm <-> ours), `timm_parity` (a timm model against
its conversion), `timm_hub` (timm's trained weights from the hub), `loading` (the
face's functions).
"""

from nfnets_jax.models.tree import ParameterMismatchError
from nfnets_jax.weights.download import (ChecksumError, DownloadError, OfflineError,
                                         PUBLISHED, WeightsError, fetch)
from nfnets_jax.weights.formats import (Params, PathLike, UntrustedPickleError, flatten_params,
                                        save_params_npz, save_params_orbax, unflatten_params)
from nfnets_jax.weights.loading import (LoadedModel, Settings, load_meta, load_model,
                                        load_params, pretrained)
from nfnets_jax.weights.workdir import (CHECKPOINTS_SUBDIR, EMA_PARAMS_ITEM, META_ITEM,
                                        PARAMS_ITEM, DamagedCheckpointError, checkpoint_manager)

__all__ = [
    "load_params", "load_meta", "load_model", "LoadedModel", "Settings", "pretrained",
    "save_params_npz", "save_params_orbax", "flatten_params", "unflatten_params",
    "Params", "PathLike", "PUBLISHED", "fetch", "checkpoint_manager",
    "PARAMS_ITEM", "EMA_PARAMS_ITEM", "META_ITEM", "CHECKPOINTS_SUBDIR",
    "ParameterMismatchError", "DamagedCheckpointError", "UntrustedPickleError",
    "WeightsError", "OfflineError", "DownloadError", "ChecksumError",
]
