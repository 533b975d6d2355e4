"""Input pipelines: the published NFNets ImageNet pipeline on current TF/TFDS.

TensorFlow is imported (and the GPUs hidden from it, so JAX keeps the
accelerators) when the pipeline is first touched: `load`, `build`, `Batch`,
`Batches`, `MEAN_RGB`, `STDDEV_RGB` or any module but the settings modules
`augment_spec`, `preproc_spec` and `options`. Those stay TensorFlow-free so a
command can check its settings before paying for TensorFlow's slow import.
`nfnets_jax`, `nfnets_jax.models` and `nfnets_jax.optim` never import it.

    from nfnets_jax.data import load
    batches = load('digits', 'train', is_training=True, batch_dims=(1, 64),
                   image_size=32, augment_name='cutmix_mixup_randaugment_405', seed=0)
    batch = next(batches)  # {'images', 'labels', 'mix_labels', 'ratio'}

    # The same, with the settings grouped (frozen dataclasses, see `options`):
    from nfnets_jax.data import Augmentation, Preprocessing, Stream, build
    batches = build('digits', 'train', is_training=True, batch_dims=(1, 64),
                    preprocessing=Preprocessing(image_size=32),
                    augmentation=Augmentation('cutmix_mixup_randaugment_405'),
                    stream=Stream(seed=0))

Modules, one concern each: `pipeline` (build, load), `options` (the settings
groups), `sources` (dataset names), `digits` (the embedded TFDS dataset),
`imagenet` (manual archive checks), `preprocess`, `randaugment`, `mixing`,
`augment_spec` (augmentation names), `preproc_spec` (image sizes and
preprocessing names), `sharding`, `integrity` (corrupt files), `rng`
(per-example seeds).
"""

import importlib
from typing import Any

from nfnets_jax.data.augment_spec import AugmentSpec, parse_augment_name
from nfnets_jax.data.options import Augmentation, Preprocessing, Reading, Stream

# Names whose modules import TensorFlow: resolved on first access (PEP 562).
_LAZY = {"Batch": "pipeline", "Batches": "pipeline", "build": "pipeline", "load": "pipeline",
         "MEAN_RGB": "preprocess", "STDDEV_RGB": "preprocess"}

__all__ = ["AugmentSpec", "Augmentation", "Batch", "Batches", "MEAN_RGB", "Preprocessing",
           "Reading", "STDDEV_RGB", "Stream", "build", "load", "parse_augment_name"]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
