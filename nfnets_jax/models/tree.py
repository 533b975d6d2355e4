"""Facts about a parameter tree and the model it belongs to.

A tree is `{module_path: {name: array}}`, as Haiku and the published files
hold it. These answer the questions a loader asks of a tree it was given:
does it fit a model (`check_params`, naming every bad leaf), how many classes
does its classifier have (`infer_num_classes`), and which NFNet variant is it
(`infer_model`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nfnets_jax.models import nfnet, registry, timm_family

Params = dict[str, dict[str, Any]]
# Listing every bad name of a wholly wrong checkpoint would bury the message.
_MAX_LISTED = 25


class ParameterMismatchError(ValueError):
  """A parameter tree does not fit the model (or layout) it is meant for.

  `missing`, `unexpected` and `mismatched` hold the offending names (with
  shapes) so that callers can act on them, not just print them.
  """

  def __init__(self, what: str,
               missing: Sequence[tuple[str, tuple[int, ...]]] = (),
               unexpected: Sequence[tuple[str, tuple[int, ...]]] = (),
               mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
               hint: str = ""):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f"{what} does not match:"]
    lines += _listing("missing (the model has them, the checkpoint does not)",
                      [f"{name} {shape}" for name, shape in self.missing])
    lines += _listing("unexpected (the checkpoint has them, the model does not)",
                      [f"{name} {shape}" for name, shape in self.unexpected])
    lines += _listing("wrong shape",
                      [f"{name}: checkpoint {got}, model {want}"
                       for name, got, want in self.mismatched])
    if hint:
      lines.append(hint)
    super().__init__("\n".join(lines))


def _listing(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  shown = [f"    {item}" for item in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    shown.append(f"    ... and {len(items) - _MAX_LISTED} more")
  return [f"  {title}: {len(items)}"] + shown


def check_shapes(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]],
                 what: str, hint: str = "") -> None:
  """Raises `ParameterMismatchError` naming every missing, unexpected and mis-shaped key."""
  missing = [(key, want[key]) for key in sorted(set(want) - set(got))]
  unexpected = [(key, got[key]) for key in sorted(set(got) - set(want))]
  mismatched = [(key, got[key], want[key]) for key in sorted(set(want) & set(got))
                if got[key] != want[key]]
  if missing or unexpected or mismatched:
    raise ParameterMismatchError(what, missing, unexpected, mismatched, hint=hint)


def leaf_shapes(params: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
  """`{"module/name": shape}` of a tree (of arrays or `jax.ShapeDtypeStruct`s)."""
  return {f"{m}/{n}": tuple(np.shape(v)) for m, group in params.items() for n, v in group.items()}


def infer_num_classes(params: Mapping[str, Mapping[str, Any]]) -> Optional[int]:
  """Classifier width from the top-level `<root>/~/linear` bias, if there is one."""
  for module, group in params.items():
    if module.count("/~/") == 1 and module.endswith("/~/linear") and "b" in group:
      return int(np.shape(group["b"])[0])
  return None


def check_params(params: Mapping[str, Mapping[str, Any]], model: str, *,
                 num_classes: Optional[int] = None,
                 model_kwargs: Optional[Mapping[str, Any]] = None,
                 source: str = "checkpoint") -> None:
  """Raises `ParameterMismatchError` unless `params` has exactly `model`'s parameters and
  shapes (the published tree; `num_classes` defaults to the tree's classifier width)."""
  if num_classes is None:
    num_classes = infer_num_classes(params) or 1000
  kwargs = dict(model_kwargs or {})
  expected = registry.param_shapes(model, num_classes, **kwargs)
  settings = ", ".join([f"num_classes={num_classes}"] + [f"{k}={v!r}" for k, v in kwargs.items()])
  check_shapes(leaf_shapes(params), leaf_shapes(expected),
               f"{source} vs model {model!r} ({settings})",
               hint="Check the model name, num_classes and model arguments the checkpoint was "
                    "trained with.")


def infer_model(params: Mapping[str, Mapping[str, Any]]) -> str:
  """'nfnet:F0' etc. from one of our NFNet parameter trees; 'timm:<name>' from a
  tree of timm's models, whose top module is the timm name.

  A stage starts at each block with a projection shortcut (every NFNet stage's
  first block has one), which gives the depths; `conv2`'s output gives widths.
  """
  roots = {module.partition("/~/")[0] for module in params}
  if len(roots) == 1 and roots <= set(timm_family.CONFIGS):
    return f"timm:{roots.pop()}"
  blocks = {}
  for module in params:
    match = re.fullmatch(r"NFNet/~/nf_block(?:_(\d+))?", module)
    if match:
      blocks[int(match[1] or 0)] = module
  depths, widths = [], []
  for k in sorted(blocks):
    if f"{blocks[k]}/~/conv_shortcut" in params or not depths:
      depths.append(0)
      conv2 = params.get(f"{blocks[k]}/~/conv2", {})
      widths.append(int(np.shape(conv2["w"])[-1]) if "w" in conv2 else None)
    depths[-1] += 1
  return nfnet_variant(depths, widths, what="this parameter tree")


def nfnet_variant(depths: list[int], widths: list[Optional[int]], what: str) -> str:
  """The NFNet whose stages have these depths and widths, or an error naming them."""
  for name, row in nfnet.ALL_VARIANTS.items():
    if list(row["depth"]) == depths and list(row["width"]) == widths:
      return f"nfnet:{name}"
  raise ValueError(
      f"Cannot tell which NFNet {what} is (stage depths {depths}, widths {widths}); "
      "pass the model name explicitly, e.g. model='nfnet:F0' (--model=nfnet:F0).")
