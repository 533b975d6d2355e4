"""Evaluation totals: the eval step's per-batch sums, added up and turned into means.

The eval step (`steps.make_eval_step`) returns, for each set of weights it
scores, the summed loss, top-1, top-5 and count of a batch's real examples.
The trainer's evaluation and `python -m nfnets_jax.evaluate` both add those
up here, so the two report the same numbers for the same examples. The sums
are kept as Python floats (float64): float32 would drop low bits of the loss
over a split of ImageNet's size.
"""

from typing import Any, Mapping

#: What the eval step sums per batch.
SUMMED = ("loss", "top1", "top5", "count")
#: The means reported, in this order.
MEANS = ("top1", "top5", "loss")


class NoExamplesError(ValueError):
  """An evaluation scored no example: its means would be a meaningless 0.0."""


class EvalTotals:
  """Running sums of the eval step's outputs, per set of weights (e.g. '' and 'ema_')."""

  def __init__(self):
    self._sums: dict[str, dict[str, float]] = {}

  def add(self, batch_sums: Mapping[str, Mapping[str, Any]]) -> None:
    """Adds one batch's `{name: {'loss', 'top1', 'top5', 'count'}}`, fetched to the host."""
    for name, sums in batch_sums.items():
      running = self._sums.setdefault(name, dict.fromkeys(SUMMED, 0.0))
      for key in SUMMED:
        running[key] += float(sums[key])

  def count(self, name: str) -> int:
    """The real examples scored so far with the weights called `name` (0 before any)."""
    return int(self._sums.get(name, {}).get("count", 0.0))

  def means(self, name: str) -> dict[str, float]:
    """top1, top5 and loss of the weights called `name`, averaged over their examples.

    All 0.0 when no example was scored.
    """
    sums = self._sums.get(name, dict.fromkeys(SUMMED, 0.0))
    count = max(sums["count"], 1.0)
    return {key: sums[key] / count for key in MEANS}

  def require_examples(self, name: str, what: str) -> None:
    """A `NoExamplesError` naming `what` (the data scored) unless the weights called
    `name` scored at least one real example."""
    if self.count(name) == 0:
      raise NoExamplesError(
          f"No example of {what} could be scored: every file was skipped as unreadable (see "
          "the warnings above) or the split is empty, so there is no top-1 to report. Check "
          "the dataset, split and data directory.")
