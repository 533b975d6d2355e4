"""Targets and accuracy on mixed (mixup/CutMix) batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.train.losses import mixed_targets, mixed_topk_correct, topk_correct


def test_mixed_accuracy_credits_each_label_by_its_share():
  logits = jnp.array([[5.0, 1.0, 0.0],   # predicts 0
                      [0.0, 4.0, 1.0],   # predicts 1
                      [0.0, 1.0, 3.0]])  # predicts 2
  labels = jnp.array([0, 0, 1])
  mix_labels = jnp.array([1, 1, 0])
  ratio = jnp.array([0.7, 0.25, 0.5])
  credit = mixed_topk_correct(logits, labels, 1, mix_labels, ratio)
  # hit the first label (0.7); hit the mixed-in label (1 - 0.25); hit neither.
  np.testing.assert_allclose(credit, [0.7, 0.75, 0.0])
  # Top-2 of the last row is {2, 1}: its first label (share 0.5) is in it.
  np.testing.assert_allclose(mixed_topk_correct(logits, labels, 2, mix_labels, ratio)[2], 0.5)


def test_unmixed_accuracy_is_plain_topk():
  logits = jnp.array([[0.0, 2.0], [3.0, 1.0]])
  labels = jnp.array([1, 1])
  np.testing.assert_array_equal(mixed_topk_correct(logits, labels, 1),
                                topk_correct(logits, labels, 1))


def test_mix_labels_without_ratio_is_an_error():
  with pytest.raises(ValueError, match="needs ratio"):
    mixed_topk_correct(jnp.zeros((1, 2)), jnp.array([0]), 1, mix_labels=jnp.array([1]))
  with pytest.raises(ValueError, match="needs ratio"):
    mixed_targets(jnp.array([0]), 2, mix_labels=jnp.array([1]))


def test_mixed_targets_sum_to_one_and_weight_by_ratio():
  targets = mixed_targets(jnp.array([0, 2]), 3, 0.0, jnp.array([1, 2]), jnp.array([0.6, 0.3]))
  np.testing.assert_allclose(targets, [[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]], atol=1e-7)
