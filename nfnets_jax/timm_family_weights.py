"""timm state dicts <-> parameters of the 'timm:<name>' models (models/timm_family.py).

`from_timm_family(state_dict, 'timm:eca_nfnet_l0')` and `to_timm_family(params,
'timm:eca_nfnet_l0')` convert layouts only: the 'timm:' models compute timm's
function (its weight standardisation, padding and gamma placement), so every
array is timm's, transposed (OIHW <-> HWIO kernels, (out, in) <-> (in, out)
linear weights, 1x1-conv squeeze-excite layers <-> linear layers, (O, 1, 1, 1)
<-> (O,) gains, (1, 1, k) <-> (k,) ECA filters). State dicts are `{name:
np.ndarray}`; torch tensors are read through `.numpy()`, so neither direction
needs PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from nfnets_jax import checkpoint

StateDict = dict[str, np.ndarray]
Params = dict[str, dict[str, np.ndarray]]

_SEP = "/~/"
FAMILY = "timm"
# Our block conv names -> timm's.
_BLOCK_CONVS = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
                "conv_shortcut": "downsample.conv"}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer in both trees. kind: 'conv' (w, gain, bias), 'se' (a 1x1 conv there, a linear
  here), 'fc' (linear), 'eca' (a Conv1d filter), 'skip' (the SkipInit scalar)."""
  kind: str
  ours: str
  timm: str


def timm_name(model: str) -> str:
  """'timm:eca_nfnet_l0' -> 'eca_nfnet_l0', refusing other families by name."""
  from nfnets_jax import models

  family, variant = models.parse_model_name(model)
  if family != FAMILY:
    raise ValueError(f"{model!r} is not one of timm's models; name it 'timm:<timm name>', one of: "
                     f"{', '.join(models.FAMILIES[FAMILY].variants)}.")
  return variant


def layers(model: str, num_classes: int = 1000) -> list[Layer]:
  """Every layer of `model` ('timm:<name>') with its name in both trees, from its plan."""
  from nfnets_jax import models

  root = timm_name(model)
  plan = models.model_plan(model, num_classes)
  stem = plan.stem.convs
  out = [Layer("conv", f"{root}{_SEP}{conv.name}",
               f"stem.conv{i + 1}" if len(stem) > 1 else "stem.conv")
         for i, conv in enumerate(stem)]
  depths = models.FAMILIES[FAMILY].variants[root]["depth"]
  stage_of = [(s, b) for s, depth in enumerate(depths) for b in range(depth)]
  for k, block in enumerate(plan.blocks):
    ours = f"{root}{_SEP}{plan.block_name}" + (f"_{k}" if k else "")
    theirs = "stages.{}.{}".format(*stage_of[k])
    if block.skip_gain:
      out.append(Layer("skip", ours, theirs))
    out += [Layer("conv", f"{ours}{_SEP}{conv.name}", f"{theirs}.{_BLOCK_CONVS[conv.name]}")
            for conv in block.convs]
    if block.se_position:
      gate = f"{theirs}.{'attn' if block.se_position == 'bottleneck' else 'attn_last'}"
      if block.attention == "se":
        out += [Layer("se", f"{ours}{_SEP}squeeze_excite{_SEP}linear", f"{gate}.fc1"),
                Layer("se", f"{ours}{_SEP}squeeze_excite{_SEP}linear_1", f"{gate}.fc2")]
      else:
        out.append(Layer("eca", f"{ours}{_SEP}eca", f"{gate}.conv"))
  if plan.final_conv is not None:
    out.append(Layer("conv", f"{root}{_SEP}final_conv", "final_conv"))
  out.append(Layer("fc", f"{root}{_SEP}linear", "head.fc"))
  return out


def _our_shapes(model: str, num_classes: int) -> dict[str, dict[str, tuple[int, ...]]]:
  from nfnets_jax import models

  shapes = models.param_shapes(model, num_classes)
  return {m: {n: tuple(leaf.shape) for n, leaf in group.items()} for m, group in shapes.items()}


def _timm_shapes(layer: Layer, ours: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """timm key -> shape for one layer, given our shapes for it."""
  t = layer.timm
  if layer.kind == "skip":
    return {f"{t}.skipinit_gain": ours["skip_gain"]}
  if layer.kind == "eca":
    return {f"{t}.weight": (1, 1) + ours["w"]}
  if layer.kind == "conv":
    h, w, i, o = ours["w"]
    return {f"{t}.weight": (o, i, h, w), f"{t}.gain": (o, 1, 1, 1), f"{t}.bias": (o,)}
  n_in, n_out = ours["w"]
  weight = (n_out, n_in, 1, 1) if layer.kind == "se" else (n_out, n_in)
  return {f"{t}.weight": weight, f"{t}.bias": (n_out,)}


def timm_shapes(model: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """The state dict timm's `model` has: key -> shape."""
  ours = _our_shapes(model, num_classes)
  want: dict[str, tuple[int, ...]] = {}
  for layer in layers(model, num_classes):
    want.update(_timm_shapes(layer, ours[layer.ours]))
  return want


def _to_numpy(value: Any) -> np.ndarray:
  """NumPy view of an array or a CPU/GPU torch tensor (without importing torch)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def num_classes_of(state_dict: Mapping[str, Any]) -> int:
  """The classifier width of a timm state dict (1000 without `head.fc`)."""
  if "head.fc.weight" in state_dict:
    return int(np.shape(state_dict["head.fc.weight"])[0])
  return 1000


def from_timm_family(state_dict: Mapping[str, Any], model: str, *,
                     num_classes: Optional[int] = None) -> Params:
  """timm's state dict of `model` ('timm:<name>') as our published parameter tree.

  Raises:
    checkpoint.ParameterMismatchError: naming every missing, unexpected and
      mis-shaped timm key.
  """
  if num_classes is None:
    num_classes = num_classes_of(state_dict)
  plan_layers = layers(model, num_classes)
  got = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
  checkpoint.check_shapes(
      got, timm_shapes(model, num_classes),
      f"timm state dict vs model {model!r} (num_classes={num_classes})",
      hint=f"Check that the file holds timm's {timm_name(model)} and the number of classes.")
  sd = {key: _to_numpy(value) for key, value in state_dict.items()}
  params: Params = {}
  for layer in plan_layers:
    t = layer.timm
    if layer.kind == "skip":
      params.setdefault(layer.ours, {})["skip_gain"] = sd[f"{t}.skipinit_gain"].copy()
    elif layer.kind == "eca":
      params[layer.ours] = {"w": sd[f"{t}.weight"].reshape(-1).copy()}
    elif layer.kind == "conv":
      params[layer.ours] = {
          "w": np.ascontiguousarray(sd[f"{t}.weight"].transpose(2, 3, 1, 0)),
          "gain": sd[f"{t}.gain"].reshape(-1).copy(),
          "bias": sd[f"{t}.bias"].copy(),
      }
    else:
      w = sd[f"{t}.weight"]
      params[layer.ours] = {"w": np.ascontiguousarray(w.reshape(w.shape[:2]).T),
                            "b": sd[f"{t}.bias"].copy()}
  return params


def _published(params: Mapping[str, Mapping[str, Any]], model: str,
               num_classes: int) -> Mapping[str, Mapping[str, Any]]:
  """`params` in the published tree, whichever block loop stacked them."""
  from nfnets_jax import models

  # 'scan' stacks every run 'auto' stacks and more, so it is tried first: a
  # scan-stacked tree also holds all of 'auto's stacked modules.
  for loop in ("scan", "auto"):
    layout = models.stacked_layout(model, num_classes, block_loop=loop)
    if layout.is_stacked_tree(params):
      return layout.to_published(params)
  return params


def to_timm_family(params: Mapping[str, Mapping[str, Any]], model: str, *,
                   num_classes: Optional[int] = None) -> StateDict:
  """Our published parameter tree of `model` ('timm:<name>') as timm's state dict.

  `params` may also be in a stacked layout (`models.transform(model).init`'s).
  The inverse of `from_timm_family`, exactly: it loads into
  `timm.create_model(<name>)` with `load_state_dict(strict=True)` once the
  arrays are tensors.

  Raises:
    checkpoint.ParameterMismatchError: if `params` does not fit `model`.
  """
  if num_classes is None:
    num_classes = checkpoint.infer_num_classes(params) or 1000
  params = _published(params, model, num_classes)
  ours = _our_shapes(model, num_classes)
  checkpoint.check_shapes(
      {f"{m}/{n}": tuple(np.shape(v)) for m, group in params.items() for n, v in group.items()},
      {f"{m}/{n}": shape for m, group in ours.items() for n, shape in group.items()},
      f"parameters vs model {model!r} (num_classes={num_classes})",
      hint="Check the model name and num_classes.")
  out: StateDict = {}
  for layer in layers(model, num_classes):
    group = {name: _to_numpy(value) for name, value in params[layer.ours].items()}
    t = layer.timm
    if layer.kind == "skip":
      out[f"{t}.skipinit_gain"] = group["skip_gain"].copy()
    elif layer.kind == "eca":
      out[f"{t}.weight"] = group["w"].reshape(1, 1, -1).copy()
    elif layer.kind == "conv":
      out[f"{t}.weight"] = np.ascontiguousarray(group["w"].transpose(3, 2, 0, 1))
      out[f"{t}.gain"] = group["gain"].reshape(-1, 1, 1, 1).copy()
      out[f"{t}.bias"] = group["bias"].copy()
    else:
      w = np.ascontiguousarray(group["w"].T)
      out[f"{t}.weight"] = w.reshape(w.shape + (1, 1)) if layer.kind == "se" else w
      out[f"{t}.bias"] = group["b"].copy()
  return out
