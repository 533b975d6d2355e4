"""NF-ResNets (Brock, De & Smith 2021a) on ImageNet, with this project's NFNet recipe.

The NF-ResNet paper trained with batch 1024, 360 epochs, SGD + Nesterov and
RandAugment/mixup variations per model, and no experiment file for them was
published. Here the NFNet recipe (AGC included) is reused at 224 px, with
RandAugment before mixing (the data loader's default): our choice, not a
published configuration.

  python -m nfnets_jax.train --config=experiments/nf_resnet.py:ResNet50 --workdir=...
"""

from nfnets_jax.models import nf_resnet
from nfnets_jax.train.config import finalize, model_config, table_row


def get_config(variant: str = "ResNet50"):
  row = table_row(nf_resnet.VARIANTS, variant, "NF-ResNet variant",
                  "experiments/nf_resnet.py:<variant>")
  c = model_config(f"nf_resnet:{variant}", stochdepth_rate=0.1, drop_rate=row["drop_rate"],
                   image_size=nf_resnet.TRAIN_IMSIZE, eval_image_size=nf_resnet.TEST_IMSIZE)
  c.dataset.augment_name = "cutmix_mixup_randaugment_410"
  return finalize(c)
