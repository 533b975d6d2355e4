"""The stacked parameter layout: each scanned run of blocks as one module.

A network built with `block_loop` 'scan' (or 'auto', for long runs) runs each
run of interchangeable blocks as one `jax.lax.scan`. `models.transform` gives
such a model's parameters in this layout: the run's blocks' modules
(`NFNet/~/nf_block_3`, `NFNet/~/nf_block_3/~/conv0`, ..., `NFNet/~/nf_block_8/...`)
become one module per sub-module, named after the run's first block and its
length (`NFNet/~/nf_block_3__x6`, `NFNet/~/nf_block_3__x6/~/conv0`), whose
arrays carry the blocks on a new leading axis. Every other module, and every
parameter name, is kept, so the optimizer's name-based groups still apply and
AGC finds the block axis by the `__x<N>` name (`optim.stacked_layers`).

Why: trained in the published per-block tree, a scanned model's gradient
program unstacks every gradient into per-block leaves and the optimizer
updates each block's arrays separately, which multiplies compile time for
deep variants (docs/performance.md). The published tree stays the format of
checkpoint files and exports: `stack` and `to_published` convert at those
edges.
"""

import functools
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from nfnets_jax.optim import groups

Params = Mapping[str, Mapping[str, Any]]

_SEP = "/~/"


class StackedLayout:
  """Converts parameter trees between the published and the stacked layout.

  `runs`: for each run to stack, the module names of its blocks in order
  (`NormFreeNet.scanned_block_names`; `models.stacked_layout(name)` builds it).
  With no runs, every conversion is the identity.
  """

  def __init__(self, runs: Sequence[Sequence[str]]):
    self.runs = tuple(tuple(run) for run in runs if len(run) > 1)
    self._run_of_block = {block: run for run in self.runs for block in run}
    self._stacked_names = {self.stacked_name(run): run for run in self.runs}

  @property
  def is_identity(self) -> bool:
    return not self.runs

  @staticmethod
  def stacked_name(run: Sequence[str]) -> str:
    """The stacked module replacing `run`'s block modules: `<first>__x<length>`."""
    return groups.stacked_module_name(run[0], len(run))

  def _split(self, module: str, names: Mapping[str, Sequence[str]]):
    """(owner, suffix) where `module` is `owner` or inside it, for an owner in `names`."""
    head, sep, _ = module.partition(_SEP)
    while True:
      if head in names:
        return head, module[len(head):]
      if not sep:
        return None, ""
      rest = module[len(head) + len(_SEP):]
      part, sep, _ = rest.partition(_SEP)
      head = f"{head}{_SEP}{part}"

  def stack(self, params: Params) -> dict[str, dict[str, Any]]:
    """The stacked tree of a published tree (its arrays copied into stacks)."""
    if self.is_identity:
      return dict(params)
    out, parts = {}, {}
    for module, leaves in params.items():
      block, suffix = self._split(module, self._run_of_block)
      if block is None:
        out[module] = leaves
      else:
        parts.setdefault((self._run_of_block[block], suffix), {})[block] = leaves
    for (run, suffix), by_block in parts.items():
      missing = [block for block in run if block not in by_block]
      if missing:
        raise ValueError(f"Cannot stack {run[0]}{suffix}: the tree has no {missing[0]}{suffix}.")
      out[self.stacked_name(run) + suffix] = {
          name: _stack_leaves([by_block[block][name] for block in run])
          for name in by_block[run[0]]}
    return out

  def _unstack(self, params: Params) -> dict[str, dict[str, Any]]:
    out = {}
    for module, leaves in params.items():
      stacked, suffix = self._split(module, self._stacked_names)
      if stacked is None:
        out[module] = leaves
        continue
      for i, block in enumerate(self._stacked_names[stacked]):
        out[block + suffix] = {name: _index(leaf, i) for name, leaf in leaves.items()}
    return out

  def unstack(self, params: Params) -> dict[str, dict[str, Any]]:
    """The published tree of a stacked tree.

    Differentiable, with the gradient of a stacked leaf returned as one stack
    (not as a sum of per-block zero-padded slices): inside a jitted gradient,
    the model's re-stacking of the blocks and this unstacking cancel out.
    """
    if self.is_identity:
      return dict(params)
    return _unstack_with_stacked_grad(self, params)

  def to_published(self, params: Params) -> dict[str, dict[str, Any]]:
    """The published tree of `params` given in either layout (differentiable as `unstack`)."""
    if self.is_identity or not self.is_stacked_tree(params):
      return dict(params)
    return self.unstack(params)

  def is_stacked_tree(self, tree: Any) -> bool:
    """Whether `tree` is a mapping holding this layout's stacked modules (or their sub-modules:
    a block may have no parameters of its own)."""
    return (isinstance(tree, Mapping) and bool(self._stacked_names)
            and _holds_all(tree, self._stacked_names))

  def is_published_tree(self, tree: Any) -> bool:
    """Whether `tree` is a mapping holding every block module of this layout's runs."""
    return (isinstance(tree, Mapping) and bool(self._run_of_block)
            and _holds_all(tree, self._run_of_block))

  def stack_all(self, tree: Any) -> Any:
    """`stack` applied to every published parameter tree inside `tree` (e.g. an optax state)."""
    if self.is_identity:
      return tree
    return jax.tree_util.tree_map(lambda t: self.stack(t) if self.is_published_tree(t) else t,
                                  tree, is_leaf=self.is_published_tree)

  def unstack_all(self, tree: Any) -> Any:
    """`unstack` applied to every stacked parameter tree inside `tree`."""
    if self.is_identity:
      return tree
    return jax.tree_util.tree_map(lambda t: self._unstack(t) if self.is_stacked_tree(t) else t,
                                  tree, is_leaf=self.is_stacked_tree)


def _holds_all(tree: Mapping[str, Any], modules: Any) -> bool:
  """Whether every one of `modules` is a key of `tree` or has a sub-module there."""
  if not all(isinstance(key, str) for key in tree):
    return False
  owners = set()
  for key in tree:
    owners.add(key)
    head, sep, rest = key.partition(_SEP)
    while sep:
      owners.add(head)
      part, sep, rest = rest.partition(_SEP)
      head = f"{head}{_SEP}{part}"
  return all(module in owners for module in modules)


def _stack_leaves(leaves: list[Any]) -> Any:
  # optax.masked's state holds placeholder nodes (no arrays) for the leaves it
  # skips; a block's placeholder stands for the whole stack.
  if not hasattr(leaves[0], "shape"):
    return leaves[0]
  return jnp.stack(leaves)


def _index(leaf: Any, i: int) -> Any:
  return leaf[i] if hasattr(leaf, "shape") else leaf


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _unstack_with_stacked_grad(layout: StackedLayout, params: Params):
  return layout._unstack(params)  # pylint: disable=protected-access


def _unstack_fwd(layout, params):
  return _unstack_with_stacked_grad(layout, params), None


def _unstack_bwd(layout, _, grads):
  return (layout.stack(grads),)


_unstack_with_stacked_grad.defvjp(_unstack_fwd, _unstack_bwd)
