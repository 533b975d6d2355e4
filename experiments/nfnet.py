"""NFNet-F0..F7 (and F0+..F7+) on ImageNet with the paper's recipe.

Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization", as its published experiment (experiment_nfnets.py) sets it:
batch 4096, 360 epochs, SGD + Nesterov 0.9, lr 0.1 x batch/256 with 5 warm-up
epochs then cosine to 0, weight decay 2e-5 (none on gains and biases), AGC 0.01
(not on the classifier's weights), label smoothing 0.1, EMA 0.99999, bf16,
stochastic depth 0.25, the variant's dropout, RandAugment level and train/test
resolutions, mixup + CutMix with RandAugment applied after mixing, once per
mixed image (`augment_before_mix=False`), and resize_crop_32 evaluation.

Ours, not published: the F0+..F7+ RandAugment levels (the published table has
F0..F7 only; a plus variant takes its base variant's level) and the evaluation
batch size, which does not change the result.

  python -m nfnets_jax.train --config=experiments/nfnet.py:F0 --workdir=...
  # The paper's modified SAM (used for the largest models):
  python -m nfnets_jax.train --config=experiments/nfnet.py:F6 --config.sam.rho=0.05 ...
"""

from nfnets_jax.models import nfnet
from nfnets_jax.train.config import finalize, model_config, table_row


def get_config(variant: str = "F0"):
  row = table_row(nfnet.VARIANTS, variant, "NFNet variant", "experiments/nfnet.py:<variant>")
  c = model_config(f"nfnet:{variant}", stochdepth_rate=0.25, drop_rate=row["drop_rate"],
                   image_size=row["train_imsize"], eval_image_size=row["test_imsize"])
  c.dataset.augment_name = f"cutmix_mixup_randaugment_{row['RA_level']}"
  c.dataset.augment_before_mix = False
  return finalize(c)
