"""NF-ResNets (Brock, De & Smith 2021a) on ImageNet, with this project's NFNet recipe.

The NF-ResNet paper trained with batch 1024, 360 epochs, SGD + Nesterov and
RandAugment/mixup variations per model, and no experiment file for them was
published. Here the NFNet recipe (AGC included) is reused at 224 px, with
RandAugment before mixing (the data loader's default): our choice, not a
published configuration.

  python -m nfnets_jax.train --config=experiments/nf_resnet.py:ResNet50 --workdir=...
"""

from nfnets_jax.models import nf_resnet
from nfnets_jax.train.config import ConfigError, base_config, finalize


def get_config(variant: str = "ResNet50"):
  if variant not in nf_resnet.VARIANTS:
    raise ConfigError(f"Unknown NF-ResNet variant {variant!r} in "
                      f"experiments/nf_resnet.py:<variant>; valid: {', '.join(nf_resnet.VARIANTS)}.")
  c = base_config()
  c.model = f"nf_resnet:{variant}"
  c.model_kwargs.stochdepth_rate = 0.1
  c.model_kwargs.drop_rate = nf_resnet.VARIANTS[variant]["drop_rate"]
  c.dataset.image_size = nf_resnet.TRAIN_IMSIZE
  c.dataset.eval_image_size = nf_resnet.TEST_IMSIZE
  c.dataset.augment_name = "cutmix_mixup_randaugment_410"
  return finalize(c)
