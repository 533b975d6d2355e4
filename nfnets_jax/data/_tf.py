"""The one place that imports TensorFlow for the input pipelines.

TensorFlow only decodes and augments images here; the accelerators belong to
JAX. If TF saw a GPU it would grab most of its memory at start-up and its ops
could be silently placed there, fighting JAX for the device. So every module of
`nfnets_jax.data` imports `tf` from here, and the first import hides the GPUs
from TensorFlow before anything initialises them.
"""

import logging

import tensorflow as tf

_log = logging.getLogger(__name__)


def _hide_accelerators() -> None:
  """Makes TF CPU-only; a no-op if TF was already initialised by the caller."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as err:  # Devices already initialised by someone else.
    _log.warning("Could not hide GPUs from TensorFlow (%s); input ops may run on a GPU.", err)


_hide_accelerators()

__all__ = ["tf"]
