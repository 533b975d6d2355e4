"""Input pipelines: the published NFNets ImageNet pipeline on current TF/TFDS.

Importing this package imports TensorFlow (and hides the GPUs from it, so JAX
keeps the accelerators); `nfnets_jax`, `nfnets_jax.models` and
`nfnets_jax.optim` never import it.

    from nfnets_jax.data import load
    batches = load('digits', 'train', is_training=True, batch_dims=(1, 64),
                   image_size=32, augment_name='cutmix_mixup_randaugment_405', seed=0)
    batch = next(batches)  # {'images', 'labels', 'mix_labels', 'ratio'}

Modules, one concern each: `pipeline` (load), `sources` (dataset names),
`digits` (the embedded TFDS dataset), `imagenet` (manual archive checks),
`preprocess`, `randaugment`, `mixing`, `augment_spec` (augmentation names),
`sharding`, `integrity` (corrupt files), `rng` (per-example seeds).
"""

from nfnets_jax.data.augment_spec import AugmentSpec, parse_augment_name
from nfnets_jax.data.pipeline import Batch, Batches, load
from nfnets_jax.data.preprocess import MEAN_RGB, STDDEV_RGB

__all__ = ["AugmentSpec", "Batch", "Batches", "MEAN_RGB", "STDDEV_RGB", "load",
           "parse_augment_name"]
