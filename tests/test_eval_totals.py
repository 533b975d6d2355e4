"""Evaluation totals: the one place where the trainer and `nfnets_jax.evaluate` add up
the eval step's per-batch sums."""

import numpy as np

from nfnets_jax.train.eval_totals import EvalTotals


def batch(loss, top1, top5, count):
  """One eval-step result for one set of weights, as float32 arrays fetched from a device."""
  return {key: np.float32(value)
          for key, value in {"loss": loss, "top1": top1, "top5": top5, "count": count}.items()}


def test_means_over_every_batch_for_each_set_of_weights():
  totals = EvalTotals()
  totals.add({"": batch(10.0, 6, 8, 8), "ema_": batch(8.0, 7, 8, 8)})
  totals.add({"": batch(2.0, 1, 2, 2), "ema_": batch(2.0, 2, 2, 2)})
  assert totals.count("") == totals.count("ema_") == 10
  assert totals.means("") == {"top1": 0.7, "top5": 1.0, "loss": 1.2}
  assert list(totals.means("ema_")) == ["top1", "top5", "loss"]  # the order results print in
  assert totals.means("ema_")["top1"] == 0.9


def test_sums_keep_the_bits_float32_would_lose():
  """An ImageNet-sized split: float32 running sums of the loss would drift."""
  totals = EvalTotals()
  float32_sum = np.float32(0.0)
  for _ in range(50_000):
    totals.add({"params": batch(0.1, 0, 0, 1)})
    float32_sum += np.float32(0.1)
  exact = 50_000 * float(np.float32(0.1))
  assert abs(totals.means("params")["loss"] * 50_000 - exact) < 1e-6
  assert abs(float(float32_sum) - exact) > 1e-3


def test_no_examples_give_zeros_not_a_division_error():
  totals = EvalTotals()
  assert totals.count("params") == 0
  assert totals.means("params") == {"top1": 0.0, "top5": 0.0, "loss": 0.0}
  totals.add({"params": batch(0.0, 0, 0, 0)})  # a batch of padding only
  assert totals.means("params") == {"top1": 0.0, "top5": 0.0, "loss": 0.0}
