"""Fine-tuning an NFNet on your own data, from pretrained weights.

  python -m nfnets_jax.train --config=experiments/finetune.py:nfnet:F0 \
      --config.dataset.name=folder:/my/images --workdir=...
  # timm's NFNets too, from timm's trained weights (the Hugging Face hub):
  python -m nfnets_jax.train --config=experiments/finetune.py:timm:eca_nfnet_l0 ...

`init_from` defaults to the variant's published ImageNet weights
(`published:F0`..`published:F6`, or timm's `timm:eca_nfnet_l0`, ... where timm
publishes some; other variants start from scratch unless it is set); the
classifier is re-initialised for the dataset's classes (`num_classes` 0: their
number, said in the log; a number set instead must match it). From timm's
weights the inputs are normalised and evaluated as timm's were
(`dataset.normalization`, `dataset.eval_preproc`: timm's `mean`/`std` and crop). Transfer
defaults, ours (short schedules with warm-up, a low learning rate and light
augmentation, as in the usual transfer recipes, e.g. BiT's):

* 2,000 steps at batch 512 (`num_train_steps`), 100 of them warm-up, then cosine;
* learning rate 0.01 x batch / 256 (a tenth of the pretraining rate), weight
  decay 1e-5, SGD + Nesterov 0.9;
* inception crop and flip only: no RandAugment, mixup or CutMix;
  stochastic depth 0.1 and the variant's dropout, label smoothing 0.1;
* AGC clipping 0.01 x sqrt(4096 / train_batch_size): the paper's 0.01 at
  batch 4096, larger for smaller batches (it clips more at small batch);
* EMA decay max(0, 1 - 10 / num_train_steps), averaging about the last tenth
  of the run; 0 (the EMA is the weights themselves) for runs of 10 steps or
  fewer, whose last tenth is under a step.

Clipping and EMA decay follow `train_batch_size` and `num_train_steps` when
those are overridden (unless set themselves). With `num_epochs`
(`num_train_steps=-1`) the step count is not known here, so the EMA decay is
0 too: set `ema_decay` for an average. A linear probe trains the head only:
`--config.freeze='^(?!NFNet/~/linear/)'` (a timm model's top module is its timm
name: `'^(?!eca_nfnet_l0/~/linear/)'`).
"""

from nfnets_jax.weights import download, timm_hub
from nfnets_jax.models import nfnet, parse_model_name, timm_family
from nfnets_jax.train.config import ConfigError, base_config, finalize


def get_config(model: str = "nfnet:F0"):
  try:
    family, variant = parse_model_name(model)
  except ValueError:  # its message lists every family; this file takes NFNets only
    family = variant = None
  if family == "timm":
    row = timm_family.CONFIGS[variant]
    c = base_config()
    c.model = model
    if variant in timm_hub.HUB_WEIGHTS:
      c.init_from = model
      # Inputs as timm's weights were trained and are evaluated on them.
      timm_settings = timm_hub.HUB_WEIGHTS[variant].settings
      c.dataset.normalization = timm_settings.normalization
      c.dataset.eval_preproc = timm_settings.eval_preproc
  elif family == "nfnet" and variant in nfnet.ALL_VARIANTS:
    row = nfnet.ALL_VARIANTS[variant]
    c = base_config()
    c.model = f"nfnet:{variant}"
    if variant in download.PUBLISHED:
      c.init_from = f"published:{variant}"
  else:
    raise ConfigError(f"experiments/finetune.py:<model> takes an NFNet, e.g. nfnet:F0; got "
                      f"{model!r}. Valid: {', '.join('nfnet:' + v for v in nfnet.ALL_VARIANTS)}, "
                      f"{', '.join('timm:' + v for v in timm_family.CONFIGS)}.")
  c.num_classes = 0  # the dataset's number of classes
  c.model_kwargs.stochdepth_rate = 0.1
  c.model_kwargs.drop_rate = row["drop_rate"]
  c.dataset.image_size = row["train_imsize"]
  c.dataset.eval_image_size = row["test_imsize"]
  c.dataset.augment_name = None
  c.train_batch_size = 512
  c.eval_batch_size = 512
  c.num_train_steps = 2000
  c.warmup_steps = 100
  c.optimizer.base_lr = 0.01
  c.optimizer.weight_decay = 1e-5
  c.optimizer.clipping = 0.01 * (4096 / c.get_ref("train_batch_size").to_float()) ** 0.5
  c.ema_decay = _ema_decay_for(c.get_ref("num_train_steps"))
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return finalize(c)


def _ema_decay_for(num_train_steps):
  """max(0, 1 - 10 / |num_train_steps|), as a reference that follows the field.

  Written with `abs` (FieldReference has no max): 0 for 1..10 steps and for -1
  (epochs), never a decay outside [0, 1) that the user did not set.
  """
  decay = 1.0 - 10.0 / abs(num_train_steps).to_float()
  return (decay + abs(decay)) / 2.0
