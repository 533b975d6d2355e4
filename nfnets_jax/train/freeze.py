"""Which parameters a run trains: `config.freeze`, a regex over `module/name` paths.

A parameter is frozen when `re.search(pattern, "<module>/<name>")` matches its
published path, e.g. `NFNet/~/stem_conv0/w`; `^(?!NFNet/~/linear/)` freezes
everything but the classifier (a linear probe). The published names are the
ones to match whatever layout the train state uses: a stacked module
(`NFNet/~/nf_block_3__x6/~/conv0`, models/stacking.py) holds one array for a
whole run of blocks, so it is frozen when the pattern matches every block's
path (`nf_block_3/~/conv0/w` ... `nf_block_8/~/conv0/w`) and trained when it
matches none; a pattern matching only some blocks of a run is an error
(train such a model with `model_kwargs.block_loop='unroll'`).

Frozen parameters are left out of everything the train step computes for
learning: their gradients are not computed, and the optimizer (AGC, weight
decay, momentum) sees, and keeps state for, the trainable ones only
(`ParamSplit.split` / `merge`, used by train/steps.py).
"""

import re
from typing import Any, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from nfnets_jax.models.stacking import StackedLayout
from nfnets_jax.train.config import ConfigError

Params = Mapping[str, Mapping[str, Any]]


class FreezeError(ConfigError):
  """`config.freeze` selects nothing, everything, or part of a stacked run."""


class ParamSplit:
  """The split of a parameter tree (in the train state's layout) into trainable
  and frozen parts. `frozen`: the `(module, name)` keys of the frozen leaves."""

  def __init__(self, frozen: frozenset[tuple[str, str]]):
    self.frozen = frozenset(frozen)

  def is_frozen(self, module: str, name: str) -> bool:
    return (module, name) in self.frozen

  def split(self, params: Params) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees of `params`; modules left empty are dropped."""
    frozen, trainable = hk.data_structures.partition(
        lambda module, name, _: (module, name) in self.frozen, params)
    return dict(trainable), dict(frozen)

  def merge(self, trainable: Params, frozen: Params) -> dict:
    return dict(hk.data_structures.merge(trainable, frozen))


def published_paths(shapes: Params, layout: StackedLayout) -> dict[tuple[str, str], list[str]]:
  """Each leaf of `shapes` (in `layout`) -> the published `module/name` paths it holds
  (one, or one per block of a stacked run, in block order)."""
  owners = {module: {name: (module, name) for name in group} for module, group in shapes.items()}
  published = layout.unstack_all(owners)
  paths: dict[tuple[str, str], list[str]] = {}
  for module, group in published.items():
    for name, owner in group.items():
      paths.setdefault(owner, []).append(f"{module}/{name}")
  return paths


def param_split(pattern: Optional[str], shapes: Params, layout: StackedLayout
                ) -> Optional[ParamSplit]:
  """The split `pattern` selects in a tree of `shapes` (None: no pattern, nothing frozen).

  Raises:
    FreezeError: the pattern matches no parameter, every parameter, or some
      but not all blocks of a stacked run (naming them).
  """
  if pattern is None:
    return None
  regex = re.compile(pattern)
  frozen = set()
  for owner, paths in published_paths(shapes, layout).items():
    hits = [bool(regex.search(path)) for path in paths]
    if all(hits):
      frozen.add(owner)
    elif any(hits):
      matched = [p for p, hit in zip(paths, hits) if hit]
      missed = [p for p, hit in zip(paths, hits) if not hit]
      raise FreezeError(
          f"config.freeze = {pattern!r} matches {matched[0]} but not {missed[0]}, which are one "
          f"stacked array ({owner[0]}/{owner[1]}): freeze whole runs of blocks, or set "
          "config.model_kwargs.block_loop='unroll' to train them as separate arrays.")
  total = sum(len(group) for group in shapes.values())
  if not frozen:
    raise FreezeError(f"config.freeze = {pattern!r} matches no parameter path; paths look like "
                      f"{next(iter(sorted(published_paths(shapes, layout).values())))[0]!r}.")
  if len(frozen) == total:
    raise FreezeError(f"config.freeze = {pattern!r} matches all {total} parameters: nothing "
                      "would be trained.")
  return ParamSplit(frozenset(frozen))


def model_split(pattern: Optional[str], model: Any, image_shape: tuple[int, int],
                layout: StackedLayout) -> Optional[ParamSplit]:
  """`param_split` for `model`'s parameters (traced, not computed); logs what it freezes."""
  if pattern is None:
    return None
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *image_shape, 3), jnp.float32))
  split = param_split(pattern, shapes, layout)
  logging.info("%s", describe_frozen(split, shapes))
  return split


def describe_frozen(split: ParamSplit, shapes: Params) -> str:
  """The start-up report of `config.freeze`: frozen and trained leaves and values."""
  frozen = sorted(split.frozen)
  trained = sorted((m, n) for m, group in shapes.items() for n in group
                   if (m, n) not in split.frozen)
  return (f"freeze: {len(frozen)} parameters frozen ({count_values(shapes, frozen):,} values: "
          f"{listed(f'{m}/{n}' for m, n in frozen)}); {len(trained)} trained "
          f"({count_values(shapes, trained):,} values: {listed(f'{m}/{n}' for m, n in trained)}).")


#: How many names a start-up report lists of each kind.
LISTED_NAMES = 4


def listed(names: Any) -> str:
  """The first `LISTED_NAMES` of `names`, and how many more there are."""
  names = list(names)
  shown = ", ".join(names[:LISTED_NAMES])
  return shown + (f", ... ({len(names) - LISTED_NAMES} more)" if len(names) > LISTED_NAMES else "")


def count_values(shapes: Params, keys: Any) -> int:
  """Number of values in the leaves `keys` ((module, name) pairs) of `shapes`."""
  return int(sum(np.prod(shapes[m][n].shape, dtype=np.int64) for m, n in keys))
