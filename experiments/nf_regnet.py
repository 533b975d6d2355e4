"""NF-RegNets B0..B8 (Brock, De & Smith 2021a) on ImageNet at their published resolutions.

The training recipe is this project's NFNet recipe (AGC included), our choice.

  python -m nfnets_jax.train --config=experiments/nf_regnet.py:B0 --workdir=...
"""

from nfnets_jax.models import nf_regnet
from nfnets_jax.train.config import base_config, finalize


def get_config(variant: str = "B0"):
  if variant not in nf_regnet.VARIANTS:
    raise ValueError(f"Unknown NF-RegNet variant {variant!r} in experiments/nf_regnet.py:<variant>; "
                     f"valid: {', '.join(nf_regnet.VARIANTS)}.")
  row = nf_regnet.VARIANTS[variant]
  c = base_config()
  c.model = f"nf_regnet:{variant}"
  c.model_kwargs.stochdepth_rate = 0.1
  c.model_kwargs.drop_rate = row["drop_rate"]
  c.model_kwargs.activation = "silu"
  c.dataset.image_size = row["train_imsize"]
  c.dataset.eval_image_size = row["test_imsize"]
  c.dataset.augment_name = "cutmix_mixup_randaugment_405"
  return finalize(c)
