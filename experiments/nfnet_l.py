"""timm's light NFNets (nfnet_l0, eca_nfnet_l0..l3) on ImageNet, with the NFNet paper's recipe.

timm's 'light' NFNets (models/timm_family.py: SiLU, group width 64, 1/4
bottlenecks, squeeze-excite or ECA gates) trained here as
experiments/nfnet.py trains NFNet-F0..F3: batch 4096, 360 epochs, SGD +
Nesterov 0.9, lr 0.1 x batch/256 with 5 warm-up epochs then cosine, weight
decay 2e-5, AGC 0.01, label smoothing 0.1, EMA 0.99999, bf16, stochastic depth
0.25, mixup + CutMix + RandAugment at the level of the F model with the same
depths (L0: F0's '405', L1 and L2: '410', L3: '415').

Ours, not timm's: that recipe (timm trained its weights with its own
`ra2`/`ra3` recipes, which are not reproduced here) and the dropout (the F
model's of the same depths). timm's: the train and test resolutions, and the
evaluation crop (`center_crop_1.0` at the test resolution), so that results
compare with timm's published top-1.

  python -m nfnets_jax.train --config=experiments/nfnet_l.py:eca_nfnet_l0 --workdir=...
  # Fine-tune timm's trained weights instead of starting from scratch:
  python -m nfnets_jax.train --config=experiments/nfnet_l.py:eca_nfnet_l0 \
      --config.init_from=timm:eca_nfnet_l0 ...
"""

from nfnets_jax.models import timm_family
from nfnets_jax.train.config import finalize, model_config, table_row

#: Light NFNet -> the RandAugment level of the NFNet-F with the same depths.
RA_LEVELS = {"nfnet_l0": "405", "eca_nfnet_l0": "405", "eca_nfnet_l1": "410",
             "eca_nfnet_l2": "410", "eca_nfnet_l3": "415"}


def get_config(name: str = "eca_nfnet_l0"):
  ra_level = table_row(RA_LEVELS, name, "light NFNet", "experiments/nfnet_l.py:<timm name>")
  row = timm_family.CONFIGS[name]
  c = model_config(f"timm:{name}", stochdepth_rate=0.25, drop_rate=row["drop_rate"],
                   image_size=row["train_imsize"], eval_image_size=row["test_imsize"])
  c.dataset.eval_preproc = "center_crop_1.0"
  c.dataset.augment_name = f"cutmix_mixup_randaugment_{ra_level}"
  c.dataset.augment_before_mix = False
  return finalize(c)
