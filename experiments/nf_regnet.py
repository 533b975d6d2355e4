"""NF-RegNets B0..B8 (Brock, De & Smith 2021a) on ImageNet with the published recipe.

Published (experiment_nf_regnets.py and the data loader's defaults it keeps):
batch 1024, 360 epochs, SGD + Nesterov 0.9 without AGC, a peak learning rate
of 0.4 whatever the batch (not scaled by batch / 256) reached after 5 linear
warm-up epochs from 0, then a cosine down to 0.001; weight decay by variant
(B0 5e-5, B1 6e-5, B2 7e-5, B3 8e-5, B4 9e-5, B5 1e-4; none on gains and
biases), label smoothing 0.1, EMA 0.99999, float32, mixup + CutMix without
RandAugment, crop_resize evaluation, stochastic depth 0.1, the variant's
dropout and train/test resolutions, and the model's defaults (width 0.75,
expansion 2.25, SE ratio 0.5, SiLU).

Ours, not published: B6-B8's weight decay (the published table stops at B5;
they take B5's 1e-4) and the evaluation batch size, which does not change the
result.

  python -m nfnets_jax.train --config=experiments/nf_regnet.py:B0 --workdir=...
"""

from nfnets_jax.models import nf_regnet
from nfnets_jax.train.config import finalize, model_config, table_row

#: Weight decay by variant: B0..B5 published, B6..B8 ours (B5's value).
WEIGHT_DECAY = {"B0": 5e-5, "B1": 6e-5, "B2": 7e-5, "B3": 8e-5, "B4": 9e-5, "B5": 1e-4,
                "B6": 1e-4, "B7": 1e-4, "B8": 1e-4}


def get_config(variant: str = "B0"):
  row = table_row(nf_regnet.VARIANTS, variant, "NF-RegNet variant",
                  "experiments/nf_regnet.py:<variant>")
  c = model_config(f"nf_regnet:{variant}", stochdepth_rate=0.1, drop_rate=row["drop_rate"],
                   image_size=row["train_imsize"], eval_image_size=row["test_imsize"])
  c.model_kwargs.activation = "silu"
  c.dataset.augment_name = "mixup_cutmix"
  c.dataset.eval_preproc = "crop_resize"
  c.train_batch_size = 1024
  c.num_epochs = 360.0
  c.warmup_epochs = 5.0
  c.optimizer.base_lr = 0.4
  c.optimizer.scale_lr_by_batch = False
  c.optimizer.min_lr = 0.001
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = WEIGHT_DECAY[variant]
  c.optimizer.clipping = 0.0
  c.label_smoothing = 0.1
  c.ema_decay = 0.99999
  c.compute_dtype = "float32"
  return finalize(c)
