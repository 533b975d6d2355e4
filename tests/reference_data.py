"""The published models' reference data (copied from shared/reference/).

`official_param_trees.json` pins the parameter layout of the published Haiku
NFNet code and `golden_outputs.npz` its forward outputs; parameters are rebuilt
from the tree with the numpy-only rule documented with the data.
"""

import json
import pathlib
import zlib

import numpy as np

DATA_DIR = pathlib.Path(__file__).parent / "data"

# model name -> constructor arguments the golden outputs were computed with.
GOLDEN_SETTINGS = {
    "nfnet:F0": {},
    "nf_resnet:ResNet50": {"drop_rate": 0.0},
    "nf_regnet:B0": {"activation": "silu"},
}


def param_trees() -> dict:
  """{'family:variant': {module: {name: shape list}}}."""
  return json.loads((DATA_DIR / "official_param_trees.json").read_text())


def golden_outputs() -> dict[str, np.ndarray]:
  with np.load(DATA_DIR / "golden_outputs.npz") as data:
    return {key: data[key] for key in data.files}


def rebuild_params(tree: dict) -> dict[str, dict[str, np.ndarray]]:
  """Deterministic float32 parameters for a tree of shapes (the reference rule)."""
  params = {}
  for module in sorted(tree):
    params[module] = {}
    for name in sorted(tree[module]):
      shape = tuple(tree[module][name])
      rng = np.random.default_rng(zlib.crc32(f"{module}/{name}".encode()))
      x = rng.standard_normal(shape).astype(np.float32)
      if name == "gain":
        value = 1 + 0.1 * x
      elif name in ("bias", "b"):
        value = 0.1 * x
      elif name == "skip_gain":
        value = 0.5 + 0.1 * x
      elif len(shape) == 2:
        value = x / np.sqrt(shape[0])
      else:
        value = x
      params[module][name] = value.astype(np.float32)
  return params
