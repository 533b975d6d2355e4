"""Starting a run from other weights: `config.init_from`.

`init_from` names what `weights.load_params` reads: a parameter file, a
training workdir (its latest step; its EMA weights with `init_from_ema`) or
published weights (`published:F0`). The trainer reads it only when its own
workdir has no checkpoint yet, so a resumed fine-tune continues from its own
state, never from `init_from` again.

Matching is by published `module/name` path (files hold the published tree
whatever layout the train state uses; models/stacking.py):

* a parameter whose name and shape match is loaded;
* the classifier (the top-level `<root>/~/linear`) keeps its fresh
  initialisation when its shape differs, as it does when `num_classes` does,
  or when `reinit_classifier` asks for it (a new task with as many classes);
* anything else that differs (a parameter missing on either side, another
  shape) is a `ParameterMismatchError` naming each parameter and both shapes.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from absl import logging

from nfnets_jax import models, weights
from nfnets_jax.models.stacking import StackedLayout
from nfnets_jax.train.config import ConfigError
from nfnets_jax.train.freeze import listed
from nfnets_jax.weights import WeightsError

Params = Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """Which published `module/name` paths come from the source and which stay fresh."""
  source: str
  loaded: tuple[str, ...]
  reinitialised: tuple[str, ...]


def is_classifier_module(module: str) -> bool:
  """The network's final classifier: a `linear` module directly under the root."""
  return module.count("/~/") == 1 and module.endswith("/~/linear")


def plan(source: str, loaded: Params, fresh: Params, *,
         reinit_classifier: bool = False) -> InitPlan:
  """What `merge` will do with `loaded` (the source's tree) for a model whose own
  tree is `fresh` (both published, arrays or shape structs).

  Raises:
    models.ParameterMismatchError: anything but the classifier differs.
  """
  got = {f"{m}/{n}": tuple(np.shape(v)) for m, group in loaded.items() for n, v in group.items()}
  want = {f"{m}/{n}": tuple(np.shape(v)) for m, group in fresh.items() for n, v in group.items()}
  head = {f"{m}/{n}" for m, group in fresh.items() if is_classifier_module(m) for n in group}
  head_differs = reinit_classifier or any(got.get(key) != want[key] for key in head)
  reinitialised = tuple(sorted(head)) if head_differs else ()
  checked = {key for key in set(got) | set(want) if not (head_differs and key in head)}
  models.check_shapes(
      {key: got[key] for key in checked & set(got)},
      {key: want[key] for key in checked & set(want)},
      f"config.init_from = {source!r} vs the model",
      hint="Only the classifier may differ (it is re-initialised); check config.model and "
           "config.model_kwargs against the run that wrote the weights.")
  loaded_keys = tuple(sorted(key for key in want if key not in reinitialised))
  return InitPlan(source, loaded_keys, reinitialised)


def merge(loaded: Params, fresh: Params, init_plan: InitPlan) -> dict[str, dict[str, Any]]:
  """`fresh` with every parameter of `init_plan.loaded` taken from `loaded`, in `fresh`'s dtype."""
  take = set(init_plan.loaded)
  return {module: {name: (np.asarray(loaded[module][name], value.dtype)
                          if f"{module}/{name}" in take else value)
                   for name, value in group.items()}
          for module, group in fresh.items()}


def load(source: str, *, ema: bool) -> dict[str, dict[str, np.ndarray]]:
  """The published tree `source` names (see the module docstring)."""
  return weights.load_params(source, ema=ema)


class InitFromError(ConfigError):
  """`config.init_from` cannot be read, or does not fit the model (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
  """The source's parameters, read and checked before the run starts, and the plan."""
  loaded: Params
  plan: InitPlan


def prepare(source: str, fresh: Params, *, ema: bool = False,
            reinit_classifier: bool = False, normalization: Optional[str] = None) -> Prepared:
  """Reads `source` and plans it against the model's tree `fresh` (shapes suffice); logs
  the plan, and warns when the run's input `normalization` is not the one `source`
  records. Any failure is an `InitFromError` naming `config.init_from`."""
  try:
    loaded = load(source, ema=ema)
    init_plan = plan(source, loaded, fresh, reinit_classifier=reinit_classifier)
    recorded = ((weights.load_meta(source) or {}).get("eval") or {}).get("normalization")
  except (OSError, ValueError, WeightsError) as err:
    raise InitFromError(f"config.init_from = {source!r}: {err}") from None
  logging.info("%s", describe(init_plan))
  if normalization is not None and recorded is not None and recorded != normalization:
    logging.warning("config.init_from = %r was trained on inputs normalised with %r, but this "
                    "run normalises with config.dataset.normalization = %r; set it to %r to "
                    "feed the weights what they were trained on.", source, recorded,
                    normalization, recorded)
  return Prepared(loaded, init_plan)


def describe(init_plan: InitPlan) -> str:
  """The start-up report: counts and the first few names."""
  lines = [f"init_from {init_plan.source}: loaded {len(init_plan.loaded)} parameters "
           f"({listed(init_plan.loaded)})"]
  if init_plan.reinitialised:
    lines.append(f"re-initialised {len(init_plan.reinitialised)} (the classifier: "
                 f"{listed(init_plan.reinitialised)})")
  else:
    lines.append("re-initialised 0")
  return "; ".join(lines) + "."


def initial_state(state: Any, prepared: Prepared, *, layout: StackedLayout,
                  state_from_params: Callable[[Any], Any]) -> Any:
  """The step-0 train state of a run that starts from `prepared`.

  `state`: the freshly initialised state (its classifier is kept where
  re-initialised); `state_from_params` builds a state around parameters in
  `layout` (steps.state_from_params, jitted onto the mesh).
  """
  fresh = layout.unstack_all(jax.tree_util.tree_map(
      lambda leaf: np.asarray(leaf.addressable_data(0)), state.params))
  return state_from_params(layout.stack(merge(prepared.loaded, fresh, prepared.plan)))
