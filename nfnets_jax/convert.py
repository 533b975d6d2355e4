"""Weight conversion: published pickles -> safe `.npz`, and timm <-> nfnets-jax.

Command line (absl flags; exactly one of --from_pickle, --from_timm, --to_timm)::

  # A published DeepMind file (a dill pickle, read without running code) to the
  # safe format, once (--trust_pickle only for other pickles, see weights/formats.py):
  python -m nfnets_jax.convert --from_pickle=F0_haiku.npz --out=F0_safe.npz
  # A timm `dm_nfnet_f*` state dict (.safetensors, or .pth with PyTorch installed):
  python -m nfnets_jax.convert --from_timm=dm_nfnet_f0.safetensors --out=F0.npz
  # Any of timm's NF models, as 'timm:<timm name>' (named: not inferred):
  python -m nfnets_jax.convert --from_timm=model.safetensors --model=timm:eca_nfnet_l0 \
      --out=eca_nfnet_l0.npz
  # Ours (any source `weights.load_params` reads) to a timm .safetensors:
  python -m nfnets_jax.convert --to_timm=F0.npz --out=dm_nfnet_f0.safetensors

Python: `nfnets_jax.weights.timm.from_timm(state_dict, model='nfnet:F0')` / `to_timm(params,
model='nfnet:F0')`, with state dicts as `{name: np.ndarray}`; neither needs PyTorch.

Which timm models convert, and how exactly: see `nfnets_jax.weights.timm`.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np

from nfnets_jax import cli, models, weights
from nfnets_jax.weights import timm

# ----------------------------------------------------------------------------- CLI


def _define_flags():
  """A private flag set, so importing this module never clashes with other CLIs' flags."""
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("from_pickle", None,
                      "A published DeepMind *_haiku.npz (a dill pickle) to convert to the safe "
                      ".npz. Read with a restricted unpickler (dicts and arrays only); other "
                      "pickles need --trust_pickle.", flag_values=fv)
  flags.DEFINE_string("from_timm", None,
                      "A timm state dict (.safetensors; .pth/.pt/.bin need PyTorch) to convert "
                      "to the safe .npz: dm_nfnet_f* (as nfnet:F*, inferred) or any timm NF model "
                      "with --model=timm:<timm name>.", flag_values=fv)
  flags.DEFINE_string("to_timm", None,
                      "Our parameters (.npz, orbax directory or training workdir) to convert to a "
                      "timm .safetensors.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output file: .npz, or .safetensors for --to_timm.",
                      flag_values=fv)
  flags.DEFINE_bool("trust_pickle", False,
                    "Unpickle the input with full dill. Not needed for the published files "
                    "(plain dicts of arrays, read safely); for other pickles it runs code named "
                    "inside the file: only for files from a source you trust.", flag_values=fv)
  flags.DEFINE_string("model", None,
                      "Model name, e.g. nfnet:F0 or timm:eca_nfnet_l0. Inferred for timm "
                      "conversions of dm_nfnet state dicts and of our trees when omitted; "
                      "optional for --from_pickle (then used to check the parameters).",
                      flag_values=fv)
  flags.DEFINE_integer("num_classes", None,
                       "Classifier size; read from the weights when omitted.", flag_values=fv)
  flags.DEFINE_bool("ema", False, "With --to_timm from a training workdir: take the EMA weights.",
                    flag_values=fv)
  flags.DEFINE_integer("step", None,
                       "With --to_timm from a training workdir: this step instead of the latest.",
                       flag_values=fv)
  flags.DEFINE_float("timm_eps", timm.TIMM_EPS,
                     "The timm model's weight-standardisation eps (std_conv_eps).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=fv)
  return fv


def _convert(fv) -> str:
  sources = {name: getattr(fv, name) for name in ("from_pickle", "from_timm", "to_timm")
             if getattr(fv, name)}
  if len(sources) != 1:
    raise cli.UsageError("Give exactly one of --from_pickle, --from_timm, --to_timm (got "
                         f"{', '.join('--' + s for s in sources) or 'none'}).")
  if not fv.out:
    raise cli.UsageError("--out is required.")
  (mode, src), = sources.items()
  out = pathlib.Path(fv.out)
  suffix = ".safetensors" if mode == "to_timm" else ".npz"
  if out.suffix != suffix:
    raise cli.UsageError(f"--out for --{mode} must end in {suffix}, got {fv.out!r}.")
  if out.exists() and not fv.overwrite:
    raise cli.UsageError(f"{fv.out} exists; pass --overwrite to replace it.")

  if mode == "from_pickle":
    params = weights.load_params(src, trust_pickle=fv.trust_pickle, model=fv.model,
                                    num_classes=fv.num_classes)
    weights.save_params_npz(params, out)
    model = fv.model or "not checked: no --model given"
    arrays = weights.flatten_params(params).values()
  elif mode == "from_timm":
    sd = timm.load_timm_state_dict(src)
    model = fv.model or timm.infer_timm_model(sd)
    params = timm.from_timm(sd, model, num_classes=fv.num_classes, timm_eps=fv.timm_eps)
    weights.save_params_npz(params, out)
    arrays = weights.flatten_params(params).values()
  else:
    params = weights.load_params(src, trust_pickle=fv.trust_pickle, ema=fv.ema, step=fv.step)
    model = fv.model or models.infer_model(params)
    sd = timm.to_timm(params, model, num_classes=fv.num_classes, timm_eps=fv.timm_eps)
    timm.save_timm_safetensors(sd, out)
    arrays = sd.values()
  count = sum(int(np.size(a)) for a in arrays)
  return f"Wrote {out} ({count / 1e6:.2f}M parameter values; model {model})."


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the converter on `argv` (program name first, as in `sys.argv`); returns the exit code.

  Exit statuses as `nfnets_jax.cli` documents them.
  """
  fv = _define_flags()
  return cli.run_tool(argv, fv, __doc__ or "", lambda _: print(_convert(fv)))


if __name__ == "__main__":
  cli.run(main)
