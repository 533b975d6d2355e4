"""timm <-> nfnets-jax parameter conversion, and timm's weight files.

`from_timm(state_dict, model)` / `to_timm(params, model)`, with state dicts as
`{name: np.ndarray}`; neither needs PyTorch. `load_timm_state_dict` reads
`.safetensors` without PyTorch (`.pth` with it); `save_timm_safetensors`
writes what timm's `load_state_dict` reads. The command line is
`python -m nfnets_jax.convert`.

Which timm models convert, and how exactly
------------------------------------------
Every model of timm's `timm/models/nfnet.py` has a 'timm:<timm name>' model
here (`models/timm_family.py`) that computes timm's function: the same
weight standardisation, padding, gamma placement and channel counts. Its
conversion moves arrays only:

* conv kernels are OIHW there, HWIO here; linear weights (out, in) vs (in, out);
  squeeze-excite layers are 1x1 convs there; gains are (O, 1, 1, 1) there;
  ECA filters (1, 1, k) there, (k,) here.

timm's `dm_nfnet_f0` ... `dm_nfnet_f6` also convert to the published
architecture, `nfnet:F0` ... `nfnet:F6`, whose only difference from timm's is
one constant: weight standardisation divides by `sqrt(fan_in * (var + 1e-5))`
there and by `sqrt(max(fan_in * var, 1e-4))` here. Both are
`gain * (w - mean) / s(var)` with a per-output-channel `s`, so that
conversion keeps `w` as it is and folds the ratio of the two denominators into
the gain: the standardised kernels are then the same. (timm evaluates GELU
exactly, the published code with tanh; docs/checkpoints.md reports the
resulting agreement. 'timm:dm_nfnet_f0' has timm's exact GELU.)

The published `nf_resnet` and `nf_regnet` families are not timm's networks
(timm pads symmetrically, has no SkipInit gain, rounds channel counts to
multiples of 8, average-pools before ResNet shortcuts); their timm
counterparts are 'timm:nf_resnet50', 'timm:nf_regnet_b0' and so on.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping, Optional

import numpy as np

from nfnets_jax import models
from nfnets_jax.models import layers, timm_family, tree
from nfnets_jax.weights import formats

#: timm's `NfCfg.std_conv_eps`: added to the weight variance before the square root.
TIMM_EPS = timm_family.TIMM_WS_EPS
#: Our families whose weights describe a timm model.
CONVERTIBLE_FAMILIES = ("nfnet", "timm")

StateDict = dict[str, np.ndarray]

_SEP = "/~/"
# Our block conv names -> timm's.
_BLOCK_CONVS = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
                "conv_shortcut": "downsample.conv"}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One layer in both layouts. kind: 'conv' (w, gain, bias), 'se' (1x1 conv <-> linear),
  'fc' (linear), 'eca' (a Conv1d filter), 'skip' (the SkipInit scalar)."""
  kind: str
  ours: str
  timm: str


@dataclasses.dataclass(frozen=True)
class _Layout:
  """A model's layers in both trees, our parameter shapes, and whether its weight
  standardisation is the published one (whose gains the conversion rescales)."""
  entries: list[_Entry]
  shapes: dict[str, dict[str, tuple[int, ...]]]
  rescales_gains: bool


def _check_convertible(model: str) -> tuple[str, str]:
  family, variant = models.parse_model_name(model)
  if family not in CONVERTIBLE_FAMILIES:
    raise ValueError(
        f"timm conversion supports timm's models ('timm:<timm name>', e.g. 'timm:nf_resnet50') "
        f"and the 'nfnet' family (timm's dm_nfnet_f0..f6), not {model!r}: timm's "
        "nf_resnet*/nf_regnet* use symmetric padding, no SkipInit gain, channel counts rounded "
        "to multiples of 8 and (ResNets) avg-pool shortcuts, so their weights do not describe "
        "the published architecture.")
  return family, variant


def _layout(model: str, num_classes: int, model_kwargs: Mapping[str, Any]) -> _Layout:
  """Layer correspondence for `model`, and our parameter shapes, from the model's plan."""
  family, variant = _check_convertible(model)
  plan = models.model_plan(model, num_classes, **model_kwargs)
  shapes = models.param_shapes(model, num_classes, **model_kwargs)
  shapes = {m: {n: tuple(leaf.shape) for n, leaf in group.items()} for m, group in shapes.items()}
  root = next(iter(shapes)).split(_SEP)[0]
  depths = models.FAMILIES[family].variants[variant]["depth"]

  stem = plan.stem.convs
  entries = [_Entry("conv", f"{root}{_SEP}{conv.name}",
                    f"stem.conv{i + 1}" if len(stem) > 1 else "stem.conv")
             for i, conv in enumerate(stem)]
  stage_of = [(s, b) for s, depth in enumerate(depths) for b in range(depth)]
  for k, block in enumerate(plan.blocks):
    ours = f"{root}{_SEP}{plan.block_name}" + (f"_{k}" if k else "")
    timm = "stages.{}.{}".format(*stage_of[k])
    if block.skip_gain:
      entries.append(_Entry("skip", ours, timm))
    entries += [_Entry("conv", f"{ours}{_SEP}{conv.name}", f"{timm}.{_BLOCK_CONVS[conv.name]}")
                for conv in block.convs]
    if block.se_position:
      # timm's `attn` gates the bottleneck (NF-RegNets), `attn_last` the block output.
      gate = f"{timm}.{'attn' if block.se_position == 'bottleneck' else 'attn_last'}"
      if block.attention == "eca":
        entries.append(_Entry("eca", f"{ours}{_SEP}eca", f"{gate}.conv"))
      else:
        entries += [_Entry("se", f"{ours}{_SEP}squeeze_excite{_SEP}linear", f"{gate}.fc1"),
                    _Entry("se", f"{ours}{_SEP}squeeze_excite{_SEP}linear_1", f"{gate}.fc2")]
  if plan.final_conv is not None:
    entries.append(_Entry("conv", f"{root}{_SEP}final_conv", "final_conv"))
  entries.append(_Entry("fc", f"{root}{_SEP}linear", "head.fc"))
  return _Layout(entries, shapes, rescales_gains=not plan.weight_std.eps_in_variance)


def _timm_shapes(entry: _Entry, ours: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """timm key -> shape for one layer, given our shapes for it."""
  t = entry.timm
  if entry.kind == "skip":
    return {f"{t}.skipinit_gain": ours["skip_gain"]}
  if entry.kind == "eca":
    return {f"{t}.weight": (1, 1) + tuple(ours["w"])}
  if entry.kind == "conv":
    h, w, i, o = ours["w"]
    return {f"{t}.weight": (o, i, h, w), f"{t}.gain": (o, 1, 1, 1), f"{t}.bias": (o,)}
  n_in, n_out = ours["w"]
  weight = (n_out, n_in, 1, 1) if entry.kind == "se" else (n_out, n_in)
  return {f"{t}.weight": weight, f"{t}.bias": (n_out,)}


def timm_shapes(model: str, num_classes: int = 1000, **model_kwargs: Any
                ) -> dict[str, tuple[int, ...]]:
  """The state dict of timm's counterpart of `model`: key -> shape."""
  layout = _layout(model, num_classes, model_kwargs)
  want: dict[str, tuple[int, ...]] = {}
  for entry in layout.entries:
    want.update(_timm_shapes(entry, layout.shapes[entry.ours]))
  return want


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
  """'nfnet:F0' etc. from a timm dm_nfnet state dict's depths and stage widths.

  Only DeepMind-compatible state dicts (with SkipInit gains) are recognised:
  timm's other models share depths and widths (nfnet_l0 and dm_nfnet_f0, say),
  so they are named, e.g. model='timm:eca_nfnet_l0'.
  """
  depths: dict[int, int] = {}
  for key in state_dict:
    match = re.match(r"stages\.(\d+)\.(\d+)\.", key)
    if match:
      s, b = int(match[1]), int(match[2])
      depths[s] = max(depths.get(s, 0), b + 1)
  if depths and not any(key.endswith("skipinit_gain") for key in state_dict):
    raise ValueError(
        "Cannot tell which timm model this state dict is: it has no SkipInit gains, so it is "
        "not a dm_nfnet; pass the model name explicitly, e.g. model='timm:eca_nfnet_l0' "
        "(--model=timm:eca_nfnet_l0).")
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
  """Converts a timm state dict to our Haiku parameter tree (the published layout).

  Args:
    state_dict: timm parameter names -> arrays (NumPy, or torch tensors).
    model: 'timm:<timm name>' (any of timm's NF models), or 'nfnet:F0'.. for a
      `dm_nfnet_f*` state dict; `None` infers an 'nfnet' variant from a
      dm_nfnet state dict's depths and widths.
    num_classes: by default the size of timm's `head.fc`.
    timm_eps: the timm model's `std_conv_eps`, folded into the gains for the
      'nfnet' family (the 'timm:' models standardise as timm does).
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
  layout = _layout(model, num_classes, model_kwargs)
  want = {}
  for entry in layout.entries:
    want.update(_timm_shapes(entry, layout.shapes[entry.ours]))
  got = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
  models.check_shapes(
      got, want, f"timm state dict vs model {model!r} (num_classes={num_classes})",
      hint="Check the model name (timm's 'eca_nfnet_l0' is 'timm:eca_nfnet_l0'; dm_nfnet_f0 is "
           "also 'nfnet:F0') and num_classes.")

  sd = {key: _to_numpy(value) for key, value in state_dict.items()}
  params: formats.Params = {}
  for entry in layout.entries:
    t = entry.timm
    if entry.kind == "skip":
      params.setdefault(entry.ours, {})["skip_gain"] = sd[f"{t}.skipinit_gain"].copy()
    elif entry.kind == "eca":
      params[entry.ours] = {"w": sd[f"{t}.weight"].reshape(-1).copy()}
    elif entry.kind == "conv":
      w = sd[f"{t}.weight"]
      gain = sd[f"{t}.gain"].reshape(-1)
      if layout.rescales_gains:
        gain = (gain.astype(np.float64) * _gain_ratio(w, timm_eps)).astype(gain.dtype)
      params[entry.ours] = {
          "w": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
          "gain": gain.copy(),
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
  """Converts our Haiku parameters to the state dict of timm's counterpart of `model`.

  The inverse of `from_timm` (exactly for 'timm:' models; up to float32
  rounding of the gains for the 'nfnet' family): the result loads into
  `timm.create_model(<timm name>)` with `load_state_dict(strict=True)` once
  turned into tensors. `params` may be in the published tree or in a stacked
  layout (`models.transform(model).init`'s). `model=None` infers it from the
  tree (`models.infer_model`).

  Raises:
    models.ParameterMismatchError: if `params` does not fit `model`.
  """
  if model is None:
    model = models.infer_model(params)
  if num_classes is None:
    num_classes = models.infer_num_classes(params) or 1000
  layout = _layout(model, num_classes, model_kwargs)
  params = models.published_tree(model, params, num_classes, **model_kwargs)
  models.check_shapes(
      {f"{m}/{n}": tuple(np.shape(v)) for m, group in params.items() for n, v in group.items()},
      {f"{m}/{n}": shape for m, group in layout.shapes.items() for n, shape in group.items()},
      f"parameters vs model {model!r} (num_classes={num_classes})",
      hint="Check the model name and num_classes.")
  out: StateDict = {}
  for entry in layout.entries:
    group = {name: _to_numpy(value) for name, value in params[entry.ours].items()}
    t = entry.timm
    if entry.kind == "skip":
      out[f"{t}.skipinit_gain"] = group["skip_gain"].copy()
    elif entry.kind == "eca":
      out[f"{t}.weight"] = group["w"].reshape(1, 1, -1).copy()
    elif entry.kind == "conv":
      w = np.ascontiguousarray(group["w"].transpose(3, 2, 0, 1))
      gain = group["gain"]
      if layout.rescales_gains:
        gain = (gain.astype(np.float64) / _gain_ratio(w, timm_eps)).astype(gain.dtype)
      out[f"{t}.weight"] = w
      out[f"{t}.gain"] = gain.reshape(-1, 1, 1, 1).copy()
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
