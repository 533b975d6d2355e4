"""Classification loss and accuracy, with label smoothing and mixed labels."""

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def mixed_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0,
                  mix_labels: Optional[jax.Array] = None,
                  ratio: Optional[jax.Array] = None) -> jax.Array:
  """Soft targets: `ratio * onehot(labels) + (1 - ratio) * onehot(mix_labels)`, smoothed.

  Mixup/CutMix produce images that are a `ratio` of one example and the rest of
  another, so the target is mixed the same way (Zhang et al. 2018; Yun et al.
  2019); label smoothing then spreads `label_smoothing` uniformly (Szegedy et
  al. 2016). Both are linear, so their order does not matter.
  """
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mix_labels is not None:
    if ratio is None:
      raise ValueError("mixed_targets: mix_labels needs ratio (the share of `labels`).")
    r = jnp.asarray(ratio, jnp.float32)[:, None]
    targets = r * targets + (1.0 - r) * jax.nn.one_hot(mix_labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return targets


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 if `labels` is among the `k` largest logits, else 0.0."""
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def mixed_topk_correct(logits: jax.Array, labels: jax.Array, k: int,
                       mix_labels: Optional[jax.Array] = None,
                       ratio: Optional[jax.Array] = None) -> jax.Array:
  """Per-example top-k credit on a mixed batch: `ratio` for hitting `labels`,
  `1 - ratio` for hitting `mix_labels` (plain `topk_correct` without mixing).

  Scoring a mixed image against its first label alone would report ~50% for
  a perfect model under mixup; weighting by the mix matches the targets.
  """
  correct = topk_correct(logits, labels, k)
  if mix_labels is None:
    return correct
  if ratio is None:
    raise ValueError("mixed_topk_correct: mix_labels needs ratio (the share of `labels`).")
  r = jnp.asarray(ratio, jnp.float32)
  return r * correct + (1.0 - r) * topk_correct(logits, mix_labels, k)
