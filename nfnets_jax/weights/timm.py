"""timm <-> nfnets-jax parameter conversion, and timm's weight files.

`from_timm(state_dict, model='nfnet:F0')` / `to_timm(params, model='nfnet:F0')`,
with state dicts as `{name: np.ndarray}`; neither needs PyTorch.
`load_timm_state_dict` reads `.safetensors` without PyTorch (`.pth` with it);
`save_timm_safetensors` writes what timm's `load_state_dict` reads. The
command line is `python -m nfnets_jax.convert`.

Which timm models map exactly
-----------------------------
timm's `dm_nfnet_f0` ... `dm_nfnet_f6` are the DeepMind architecture: same
widths, groups, SAME padding (`ScaledStdConv2dSame`), gamma constants (applied
in the activations), SkipInit gains, avg-pool shortcuts and squeeze-excite.
Their differences from ours are a matter of layout and of one constant, which
the conversion accounts for:

* conv kernels are OIHW there, HWIO here; linear weights (out, in) vs (in, out);
  squeeze-excite layers are 1x1 convs there; gains are (O, 1, 1, 1) there.
* weight standardisation divides by `sqrt(fan_in * (var + 1e-5))` there and by
  `sqrt(max(fan_in * var, 1e-4))` here. Both are `gain * (w - mean) / s(var)`
  with a per-output-channel `s`, so the conversion keeps `w` as it is and folds
  the ratio of the two denominators into the gain. The standardised kernels,
  and therefore the networks, are then the same function, not approximately so.
* timm evaluates GELU exactly (erf); this project, like the published code,
  uses `jax.nn.gelu`'s tanh approximation. That is a difference between the
  two implementations, not the weights; docs/checkpoints.md reports the
  resulting logit agreement.

timm's `nfnet_f*`, `nf_resnet*` and `nf_regnet*` are not DeepMind's
architecture (symmetric instead of SAME padding, no SkipInit gain, channel
counts rounded to multiples of 8, avg-pool instead of strided shortcuts for
ResNets), so no exact mapping exists; only the `nfnet` family converts.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping, Optional

import numpy as np

from nfnets_jax import models
from nfnets_jax.models import layers, tree
from nfnets_jax.weights import formats

#: timm's `NfCfg.std_conv_eps`: added to the weight variance before the square root.
TIMM_EPS = 1e-5

StateDict = dict[str, np.ndarray]

# Our block conv names -> timm's.
_BLOCK_CONVS = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
                "conv_shortcut": "downsample.conv"}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One layer in both layouts. kind: 'conv' (w, gain, bias), 'se' (1x1 conv <-> linear),
  'fc' (linear), 'skip' (the SkipInit scalar)."""
  kind: str
  ours: str
  timm: str


def _layout(model: str, num_classes: int, model_kwargs: Mapping[str, Any]
            ) -> tuple[list[_Entry], dict[str, dict[str, tuple[int, ...]]]]:
  """Layer correspondence for `model`, and our parameter shapes, from the model's plan."""
  family, variant = models.parse_model_name(model)
  if family != "nfnet":
    raise ValueError(
        f"timm conversion supports the 'nfnet' family (timm's dm_nfnet_f0..f6), not {model!r}: "
        "timm's nf_resnet*/nf_regnet* use symmetric padding, no SkipInit gain, channel counts "
        "rounded to multiples of 8 and (ResNets) avg-pool shortcuts, so their weights do not "
        "describe the published architecture.")
  plan = models.model_plan(model, num_classes, **model_kwargs)
  shapes = models.param_shapes(model, num_classes, **model_kwargs)
  shapes = {m: {n: tuple(leaf.shape) for n, leaf in group.items()} for m, group in shapes.items()}
  root = next(iter(shapes)).split("/~/")[0]
  depths = models.FAMILIES[family].variants[variant]["depth"]

  entries = [_Entry("conv", f"{root}/~/{conv.name}", f"stem.conv{i + 1}")
             for i, conv in enumerate(plan.stem.convs)]
  stage_of = [(s, b) for s, depth in enumerate(depths) for b in range(depth)]
  for k, block in enumerate(plan.blocks):
    ours = f"{root}/~/{plan.block_name}" + (f"_{k}" if k else "")
    timm = "stages.{}.{}".format(*stage_of[k])
    entries.append(_Entry("skip", ours, timm))
    entries += [_Entry("conv", f"{ours}/~/{conv.name}", f"{timm}.{_BLOCK_CONVS[conv.name]}")
                for conv in block.convs]
    if block.se_position:  # NFNets excite the block output: timm's `attn_last`.
      se = f"{timm}.attn_last"
      entries += [_Entry("se", f"{ours}/~/squeeze_excite/~/linear", f"{se}.fc1"),
                  _Entry("se", f"{ours}/~/squeeze_excite/~/linear_1", f"{se}.fc2")]
  if plan.final_conv is not None:
    entries.append(_Entry("conv", f"{root}/~/final_conv", "final_conv"))
  entries.append(_Entry("fc", f"{root}/~/linear", "head.fc"))
  return entries, shapes


def _timm_shapes(entry: _Entry, ours: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """timm key -> shape for one layer, given our shapes for it."""
  if entry.kind == "skip":
    return {f"{entry.timm}.skipinit_gain": ours["skip_gain"]}
  if entry.kind == "conv":
    h, w, i, o = ours["w"]
    return {f"{entry.timm}.weight": (o, i, h, w), f"{entry.timm}.gain": (o, 1, 1, 1),
            f"{entry.timm}.bias": (o,)}
  n_in, n_out = ours["w"]
  weight = (n_out, n_in, 1, 1) if entry.kind == "se" else (n_out, n_in)
  return {f"{entry.timm}.weight": weight, f"{entry.timm}.bias": (n_out,)}


def _gain_ratio(w_oihw: np.ndarray, timm_eps: float) -> np.ndarray:
  """Per output channel: (our standardisation denominator) / (timm's), in float64.

  With it, `our_gain = timm_gain * ratio` gives the same standardised kernel.
  """
  w = w_oihw.reshape(w_oihw.shape[0], -1).astype(np.float64)
  fan_in = w.shape[1]
  var = w.var(axis=1)
  return np.sqrt(np.maximum(fan_in * var, layers.WS_EPS)) / np.sqrt(fan_in * (var + timm_eps))


def _to_numpy(value: Any) -> np.ndarray:
  """NumPy view of an array or a CPU/GPU torch tensor (without importing torch)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def infer_timm_model(state_dict: Mapping[str, Any]) -> str:
  """'nfnet:F0' etc. from a timm dm_nfnet state dict's depths and stage widths."""
  depths: dict[int, int] = {}
  for key in state_dict:
    match = re.match(r"stages\.(\d+)\.(\d+)\.", key)
    if match:
      s, b = int(match[1]), int(match[2])
      depths[s] = max(depths.get(s, 0), b + 1)
  widths = []
  for s in sorted(depths):
    key = f"stages.{s}.0.conv3.weight"
    widths.append(int(np.shape(state_dict[key])[0]) if key in state_dict else None)
  return tree.nfnet_variant([depths[s] for s in sorted(depths)], widths,
                            what="this timm state dict")


def _infer_timm_num_classes(state_dict: Mapping[str, Any]) -> int:
  if "head.fc.weight" in state_dict:
    return int(np.shape(state_dict["head.fc.weight"])[0])
  return 1000


def from_timm(state_dict: Mapping[str, Any], model: Optional[str] = "nfnet:F0", *,
              num_classes: Optional[int] = None, timm_eps: float = TIMM_EPS,
              **model_kwargs: Any) -> formats.Params:
  """Converts a timm `dm_nfnet_f*` state dict to our Haiku parameter tree.

  Args:
    state_dict: timm parameter names -> arrays (NumPy, or torch tensors).
    model: our model name; `None` infers it from the state dict's depths and widths.
    num_classes: by default the size of timm's `head.fc`.
    timm_eps: the timm model's `std_conv_eps` (timm's default for these models).
    **model_kwargs: constructor arguments of our model, e.g. `width`.

  Returns:
    `{module: {name: np.ndarray}}` (float32 stays float32), whose network
    computes the same function as the timm model (see the module docstring).

  Raises:
    models.ParameterMismatchError: listing missing, unexpected and
      mis-shaped timm keys.
  """
  if model is None:
    model = infer_timm_model(state_dict)
  if num_classes is None:
    num_classes = _infer_timm_num_classes(state_dict)
  entries, ours = _layout(model, num_classes, model_kwargs)
  want = {}
  for entry in entries:
    want.update(_timm_shapes(entry, ours[entry.ours]))
  got = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
  models.check_shapes(
      got, want, f"timm state dict vs model {model!r} (num_classes={num_classes})",
      hint="Only timm's dm_nfnet_f* layout converts exactly (see nfnets_jax.weights.timm); check "
           "the model name and num_classes.")

  sd = {key: _to_numpy(value) for key, value in state_dict.items()}
  params: formats.Params = {}
  for entry in entries:
    t = entry.timm
    if entry.kind == "skip":
      params.setdefault(entry.ours, {})["skip_gain"] = sd[f"{t}.skipinit_gain"].copy()
    elif entry.kind == "conv":
      w = sd[f"{t}.weight"]
      gain = sd[f"{t}.gain"].reshape(-1)
      params[entry.ours] = {
          "w": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
          "gain": (gain.astype(np.float64) * _gain_ratio(w, timm_eps)).astype(gain.dtype),
          "bias": sd[f"{t}.bias"].copy(),
      }
    else:
      w = sd[f"{t}.weight"]
      w = w.reshape(w.shape[0], w.shape[1])
      params[entry.ours] = {"w": np.ascontiguousarray(w.T), "b": sd[f"{t}.bias"].copy()}
  return params


def to_timm(params: Mapping[str, Mapping[str, Any]], model: Optional[str] = "nfnet:F0", *,
            num_classes: Optional[int] = None, timm_eps: float = TIMM_EPS,
            **model_kwargs: Any) -> StateDict:
  """Converts our Haiku parameters to a timm `dm_nfnet_f*` state dict.

  The inverse of `from_timm` (up to float32 rounding of the gains): the result
  loads into `timm.create_model('dm_nfnet_f0')` with `load_state_dict(strict=True)`
  once turned into tensors. `model=None` infers the NFNet variant.

  Raises:
    models.ParameterMismatchError: if `params` does not fit `model`.
  """
  if model is None:
    model = models.infer_model(params)
  if num_classes is None:
    num_classes = models.infer_num_classes(params) or 1000
  entries, ours = _layout(model, num_classes, model_kwargs)
  models.check_shapes(
      {f"{m}/{n}": tuple(np.shape(v)) for m, group in params.items() for n, v in group.items()},
      {f"{m}/{n}": shape for m, group in ours.items() for n, shape in group.items()},
      f"parameters vs model {model!r} (num_classes={num_classes})",
      hint="Check the model name and num_classes.")
  out: StateDict = {}
  for entry in entries:
    group = {name: _to_numpy(value) for name, value in params[entry.ours].items()}
    t = entry.timm
    if entry.kind == "skip":
      out[f"{t}.skipinit_gain"] = group["skip_gain"].copy()
    elif entry.kind == "conv":
      w = np.ascontiguousarray(group["w"].transpose(3, 2, 0, 1))
      gain = group["gain"]
      timm_gain = gain.astype(np.float64) / _gain_ratio(w, timm_eps)
      out[f"{t}.weight"] = w
      out[f"{t}.gain"] = timm_gain.astype(gain.dtype).reshape(-1, 1, 1, 1)
      out[f"{t}.bias"] = group["bias"].copy()
    else:
      w = np.ascontiguousarray(group["w"].T)
      out[f"{t}.weight"] = w.reshape(w.shape + (1, 1)) if entry.kind == "se" else w
      out[f"{t}.bias"] = group["b"].copy()
  return out


# ----------------------------------------------------------------------------- timm files


def load_timm_state_dict(path: formats.PathLike) -> StateDict:
  """Reads a timm state dict: `.safetensors` without PyTorch, `.pth`/`.pt`/`.bin` with it.

  `.pth` files are read with `torch.load(weights_only=True)`, which refuses
  pickled code. Training checkpoints that wrap the weights under
  `state_dict`/`model` are unwrapped, and a DistributedDataParallel `module.`
  prefix is dropped.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No timm state dict at {str(path)!r}.")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return load_file(str(path))
  if path.suffix not in (".pth", ".pt", ".bin"):
    raise ValueError(f"Unknown timm weight file type {path.suffix!r} ({str(path)!r}); expected "
                     ".safetensors, .pth, .pt or .bin.")
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"Reading {str(path)!r} needs PyTorch (pip install torch). Without it, use a "
        ".safetensors export of the weights, which needs only the safetensors package.") from e
  obj = torch.load(str(path), map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict.")
  sd = {str(k): _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def save_timm_safetensors(state_dict: Mapping[str, Any], path: formats.PathLike) -> pathlib.Path:
  """Writes a state dict as `.safetensors` (timm's `load_state_dict` reads it via safetensors.torch)."""
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"timm weights are written as .safetensors; got {str(path)!r}.")
  path.parent.mkdir(parents=True, exist_ok=True)
  # np.require keeps 0-d arrays 0-d (SkipInit gains); ascontiguousarray would make them 1-d.
  tensors = {k: np.require(_to_numpy(v), requirements="C") for k, v in state_dict.items()}
  # 'format': 'pt' is what Hugging Face tooling expects of PyTorch weights.
  save_file(tensors, str(path), metadata={"format": "pt"})
  return path
