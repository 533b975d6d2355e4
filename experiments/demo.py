"""Demo: a tiny NFNet on the embedded 8x8 digits (scikit-learn), on a laptop CPU.

No download: `digits` is a real TFDS dataset built from the copy that ships
with scikit-learn, so this runs the same pipeline as ImageNet.

  python -m nfnets_jax.train --config=experiments/demo.py --workdir=/tmp/nfnets_demo
"""

from nfnets_jax.train.config import base_config, finalize


def get_config():
  c = base_config()
  c.model = "nfnet:nano"
  c.num_classes = 10
  c.model_kwargs.stochdepth_rate = 0.0
  c.model_kwargs.drop_rate = 0.25
  c.dataset.name = "digits"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.image_size = 32
  c.dataset.eval_image_size = 32
  # Mixup (alpha 0.2) on pairs of digits: the one published augmentation that
  # does not change what a digit is; it lowers the demo's test errors.
  c.dataset.augment_name = "mixup"
  c.dataset.train_preproc = "resize"  # crops and flips would change what digit it is
  c.dataset.eval_preproc = "resize_crop_1"  # plain resize: no margin to crop on 8x8 digits
  c.dataset.deterministic = True
  # A short run: TF's autotuner would hold up its exit (see data.load).
  c.dataset.autotune = False
  c.train_batch_size = 64
  c.eval_batch_size = 120
  c.num_epochs = 24.0
  c.warmup_epochs = 1.0
  c.optimizer.base_lr = 0.4
  c.optimizer.weight_decay = 5e-4
  # AGC's threshold grows as the batch shrinks (paper, Fig. 3): 0.01 is for
  # batch 4096; at batch 64 it clips a third of all units every step.
  c.optimizer.clipping = 0.04
  c.label_smoothing = 0.1
  c.ema_decay = 0.99
  c.compute_dtype = "float32"
  c.log_every_steps = 50
  c.checkpoint_every_steps = 100
  return finalize(c)
