"""Signal-propagation plots (SPPs): how a model treats its signal at initialisation.

The NF papers (Brock, De & Smith 2021, "Characterizing signal propagation to
close the performance gap in unnormalized ResNets") design normalizer-free
networks by feeding a batch of N(0, 1) images through the freshly initialised
model and plotting, after the stem and after every residual block,
  * the average squared channel mean (mean shift),
  * the average channel variance (signal scale),
  * the average channel variance of each residual branch before it is added.
A batch-normalised ResNet is the reference: its variance grows linearly with
depth within a stage and resets at each transition; an NF-ResNet's grows by
alpha^2 per block and resets too, staying near 1.

    python -m nfnets_jax.spp --model=nfnet:F0 --compare=bn_resnet:ResNet50 --out=spp.png

writes the plot (three panels, one curve per model) and the numbers next to it
(`spp.csv`: model, block, avg_sq_mean, avg_var, res_avg_var; block 0 is the
stem output, block k the output of the k-th residual block).

NF models run in inference mode (no dropout, no stochastic depth). Their
residual branches end in a `skip_gain` that SkipInit initialises to 0, which
makes every block the identity at init; the papers' plots show the branches
switched on (variance growing by alpha^2 per block), so `--skip_gain`
defaults to 1 (0 shows the SkipInit network as initialised). timm's own
models (`timm:nfnet_l0`, `timm:nf_regnet_b0`, ...; not `timm:dm_nfnet_*`)
have no skip gain: the last convolution of each branch (`conv2`) starts with
a gain of 0 instead, so `--skip_gain` sets that gain vector to the value (the
same branch as a skip gain's at 0 and 1; in between it scales the branch
before an output gate rather than after). BatchNorm models
run in training mode: normalising with the batch's own statistics is what
BatchNorm does to the signal during training (their running averages at init
are not meaningful).
"""

import csv
import dataclasses
import inspect
import math
import pathlib
from typing import Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import cli
from nfnets_jax.models import activations, registry
from nfnets_jax.models.architecture import NetworkPlan

METRICS = ("avg_sq_mean", "avg_var", "res_avg_var")
METRIC_LABELS = {
    "avg_sq_mean": "average squared channel mean",
    "avg_var": "average channel variance",
    "res_avg_var": "residual-branch average channel variance",
}
CSV_COLUMNS = ("model", "block") + METRICS
#: Figure size (inches) and resolution: the PNG is 1650 x 520 pixels.
FIGSIZE = (16.5, 5.2)
DPI = 100
#: Every family downsamples by 32: at 32 px the last stage is already 1x1.
MIN_IMAGE_SIZE = 32
#: y-axis scales. Log is the default: models differ by orders of magnitude
#: (NFNets' average-pooled transitions shrink the signal, BN's grows), and a
#: linear axis flattens the smaller one; `linear` looks like the papers' plots.
YSCALES = ("log", "linear")
# The initialisers' draws use XLA's RngBitGenerator, which compiles faster on
# CPU than threefry (see docs/performance.md); these parameters are never trained.
_INIT_RNG_IMPL = "unsafe_rbg"


@dataclasses.dataclass(frozen=True)
class SignalProfile:
  """The SPP metrics of one model: index d of `avg_sq_mean`/`avg_var` is the
  signal after d blocks (0 = stem output); `res_avg_var[k]` is block k's
  residual branch, plotted at depth k + 1 (where it is added)."""
  model: str
  activation: str
  stateful: bool
  skip_gains_set: int
  avg_sq_mean: np.ndarray
  avg_var: np.ndarray
  res_avg_var: np.ndarray
  transitions: tuple[int, ...]  # depths whose block changes shape (projection shortcut)
  branch_end_gains_set: int = 0  # zero-initialised conv2 gains set instead (timm's models)

  @property
  def num_blocks(self) -> int:
    return len(self.res_avg_var)

  def label(self) -> str:
    return f"{self.model} ({'BatchNorm, ' if self.stateful else ''}{self.activation})"


def check_settings(names: Sequence[str], batch: int, image_size: int,
                   activation: Optional[str], skip_gain: float, yscale: str = "log") -> None:
  """Validates everything up front, so that a typo fails before minutes of compiling."""
  if not names:
    raise ValueError("No model to plot; pass --model=family:variant, e.g. nfnet:F0.")
  for name in names:
    registry.parse_model_name(name)
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise ValueError(f"batch must be a positive integer, got {batch!r}.")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
    raise ValueError(
        f"image_size must be an integer >= {MIN_IMAGE_SIZE} (the networks downsample by 32), "
        f"got {image_size!r}.")
  if activation is not None:
    activations.get_activation(activation, elementwise_only=True)
    for name in names:
      check_activation_override(name, activation)
  if not math.isfinite(skip_gain):
    raise ValueError(f"skip_gain must be a finite number, got {skip_gain!r}.")
  if yscale not in YSCALES:
    raise ValueError(f"Unknown yscale {yscale!r}; valid: {', '.join(YSCALES)}.")


def check_activation_override(name: str, activation: str) -> None:
  """A ValueError unless `name`'s family takes an `activation` argument (timm's models
  keep timm's own activation, with its gamma folded into their convolutions)."""
  family, _ = registry.parse_model_name(name)
  if "activation" not in inspect.signature(registry.FAMILIES[family].plan_fn).parameters:
    takers = [f for f, spec in registry.FAMILIES.items()
              if "activation" in inspect.signature(spec.plan_fn).parameters]
    raise ValueError(
        f"--activation={activation} cannot override the activation of {name!r}: its family "
        f"keeps its own ({registry.model_plan(name).activation}). Families that take one: "
        f"{', '.join(takers)}; leave --activation out to plot {name!r}.")


def set_skip_gains(params: hk.Params, value: float) -> tuple[hk.Params, int]:
  """Sets every `skip_gain` parameter to `value`; returns the new params and how many."""
  count = sum(name == "skip_gain" for _, name, _ in hk.data_structures.traverse(params))
  params = hk.data_structures.map(
      lambda module, name, p: jnp.full_like(p, value) if name == "skip_gain" else p, params)
  return params, count


def branch_end_convs(plan: NetworkPlan) -> list[str]:
  """Module paths, relative to the model, of the last convolution of every block whose
  branch is switched off by a zero-initialised gain instead of a skip gain (timm's)."""
  return [f"{plan.block_name}{f'_{k}' if k else ''}/~/{conv.name}"
          for k, block in enumerate(plan.blocks) for conv in block.convs
          if conv.name == "conv2" and not block.skip_gain and conv.gain_init == 0.0]


def set_branch_end_gains(params: hk.Params, plan: NetworkPlan,
                         value: float) -> tuple[hk.Params, int]:
  """Sets the `gain` of every `branch_end_convs(plan)` convolution to `value`;
  returns the new params and how many convolutions."""
  suffixes = tuple(f"/~/{path}" for path in branch_end_convs(plan))
  chosen = [m for m in params if m.endswith(suffixes)]
  if len(chosen) != len(suffixes):
    raise ValueError(f"Expected {len(suffixes)} zero-initialised branch-end convolutions "
                     f"({plan.block_name}*/~/conv2), found {len(chosen)} in the parameters.")
  params = hk.data_structures.map(
      lambda module, name, p: (jnp.full_like(p, value) if name == "gain" and module in chosen
                               else p), params)
  return params, len(chosen)


def gaussian_images(batch: int, image_size: int, seed: int) -> jax.Array:
  """The SPP input: i.i.d. N(0, 1) pixels, NHWC, float32; the same for every model."""
  return jax.random.normal(jax.random.key(seed), (batch, image_size, image_size, 3), jnp.float32)


def measure(name: str, images: jax.Array, *, activation: Optional[str] = None,
            skip_gain: float = 1.0, seed: int = 0) -> SignalProfile:
  """Initialises `name` and returns its signal metrics on `images`.

  Initialisation, the skip-gain override and the forward pass are one jitted
  function, so each model compiles once; only the metrics leave it.
  """
  kwargs = {} if activation is None else {"activation": activation}
  plan = registry.model_plan(name, **kwargs)
  stateful = registry.is_stateful(name)
  model = registry.transform_with_state(name, **kwargs)

  gains_set = []  # (skip gains, branch-end gains), filled in while tracing

  def profile(init_key: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
    params, state = model.init(init_key, x[:1], is_training=False)
    params, skip_gains = set_skip_gains(params, skip_gain)
    params, branch_end_gains = set_branch_end_gains(params, plan, skip_gain)
    gains_set.append((skip_gains, branch_end_gains))
    # NF models in inference mode draw no randomness; the key only serves a BN
    # model built with dropout, which touches the logits alone (dropped here).
    outputs, _ = model.apply(params, state, jax.random.key(seed), x,
                             is_training=stateful, return_metrics=True)
    return {key: value for key, value in outputs.items() if key not in ("logits", "pool")}

  init_key = jax.random.key(seed, impl=_INIT_RNG_IMPL)
  metrics = jax.device_get(jax.jit(profile)(init_key, images))
  num_blocks = len(plan.blocks)

  def series(metric: str, length: int) -> np.ndarray:
    return np.array([float(metrics[f"{metric}_{i}"]) for i in range(length)], np.float64)

  return SignalProfile(
      model=name, activation=plan.activation, stateful=stateful, skip_gains_set=gains_set[0][0],
      branch_end_gains_set=gains_set[0][1],
      avg_sq_mean=series("avg_sq_mean", num_blocks + 1),
      avg_var=series("avg_var", num_blocks + 1),
      res_avg_var=series("res_avg_var", num_blocks),
      transitions=tuple(k + 1 for k, block in enumerate(plan.blocks) if block.use_projection))


def write_csv(profiles: Sequence[SignalProfile], path: pathlib.Path) -> None:
  """One row per model and depth; `res_avg_var` is empty at depth 0 (the stem has no branch)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for p in profiles:
      for d in range(p.num_blocks + 1):
        res = f"{p.res_avg_var[d - 1]:.8g}" if d else ""
        writer.writerow([p.model, d, f"{p.avg_sq_mean[d]:.8g}", f"{p.avg_var[d]:.8g}", res])


def plot(profiles: Sequence[SignalProfile], path: pathlib.Path, title: str,
         yscale: str = "log") -> None:
  """Three panels over depth, one curve per model; dotted lines mark stage transitions."""
  if yscale not in YSCALES:
    raise ValueError(f"Unknown yscale {yscale!r}; valid: {', '.join(YSCALES)}.")
  # A bare Figure, not pyplot: no global backend switch in the caller's session
  # (a notebook keeps its own), and savefig renders the PNG with Agg.
  from matplotlib.figure import Figure

  fig = Figure(figsize=FIGSIZE, dpi=DPI)
  axes = fig.subplots(1, 3)
  for i, p in enumerate(profiles):
    color = f"C{i}"
    depth = np.arange(p.num_blocks + 1)
    series = {"avg_sq_mean": (depth, p.avg_sq_mean), "avg_var": (depth, p.avg_var),
              "res_avg_var": (depth[1:], p.res_avg_var)}
    for ax, metric in zip(axes, METRICS):
      x, y = series[metric]
      ax.plot(x, y, "o-", color=color, markersize=3, linewidth=1.5, label=p.label())
      for t in p.transitions:
        ax.axvline(t, color=color, linestyle=":", linewidth=0.8, alpha=0.5)
  for ax, metric in zip(axes, METRICS):
    ax.set_title(METRIC_LABELS[metric], fontsize=11)
    ax.set_xlabel("depth (residual blocks; 0 = stem output)")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_yscale(yscale)
    if yscale == "linear":
      ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(profiles), frameon=False,
             fontsize=10)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=DPI, format="png")


def describe(batch: int, image_size: int, seed: int, skip_gain: float,
             activation: Optional[str]) -> str:
  """The figure title: every setting that changes the curves."""
  act = f", activation={activation} for every model" if activation else ""
  return (f"Signal propagation at initialisation: N(0,1) input, batch {batch}, "
          f"{image_size}x{image_size} px, seed {seed}, float32{act}\n"
          f"NF models: inference mode, skip_gain={skip_gain:g}; BatchNorm models: training mode "
          "(batch statistics). Dotted lines: stage transitions.")


def _check_out(out: str) -> pathlib.Path:
  png = pathlib.Path(out)
  if png.suffix.lower() != ".png":
    raise ValueError(f"--out must name a .png file (the CSV goes next to it), got {out!r}.")
  return png


def run(model: str, compare: Sequence[str], out: str, batch: int = 16, image_size: int = 224,
        activation: Optional[str] = None, skip_gain: float = 1.0, seed: int = 0,
        yscale: str = "log") -> tuple[pathlib.Path, pathlib.Path, list[SignalProfile]]:
  """Measures every model, writes the PNG at `out` and the CSV next to it.

  Returns (png path, csv path, profiles).
  """
  names = [model, *compare]
  check_settings(names, batch, image_size, activation, skip_gain, yscale)
  png = _check_out(out)
  png.parent.mkdir(parents=True, exist_ok=True)
  images = gaussian_images(batch, image_size, seed)
  profiles = [measure(name, images, activation=activation, skip_gain=skip_gain, seed=seed)
              for name in names]
  csv_path = png.with_suffix(".csv")
  write_csv(profiles, csv_path)
  plot(profiles, png, describe(batch, image_size, seed, skip_gain, activation), yscale)
  return png, csv_path, profiles


def _define_flags():
  """A private flag set: importing this module never clashes with other CLIs' flags."""
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("model", "nfnet:F0",
                      "Model to plot, 'family:variant' (e.g. nf_resnet:ResNet50).", flag_values=fv)
  flags.DEFINE_list("compare", ["bn_resnet:ResNet50"],
                    "Models to plot alongside, comma-separated; empty for none.", flag_values=fv)
  flags.DEFINE_string("out", "spp.png",
                      "Output PNG; the CSV is written next to it (same name, .csv).", flag_values=fv)
  flags.DEFINE_integer("batch", 16, "Number of Gaussian images.", flag_values=fv)
  flags.DEFINE_integer("image_size", 224, "Image height and width in pixels.", flag_values=fv)
  flags.DEFINE_string("activation", None,
                      "Override every model's activation (default: each model's own).",
                      flag_values=fv)
  flags.DEFINE_float("skip_gain", 1.0,
                     "Value for every NF skip_gain before the forward pass (SkipInit's init is "
                     "0), and for the zero-initialised conv2 gains of timm's models.",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the input images and the initialisation.",
                       flag_values=fv)
  flags.DEFINE_string("yscale", "log", f"y-axis scale: {' or '.join(YSCALES)}.", flag_values=fv)
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the tool on `argv` (program name first, as in `sys.argv`); returns the exit code.

  Exit statuses as `nfnets_jax.cli` documents them: bad flags or values exit
  with 2 and a message naming the value and the valid choices.
  """
  fv = _define_flags()
  return cli.run_tool(argv, fv, __doc__ or "", lambda _: _plot_from_flags(fv))


def _plot_from_flags(fv) -> None:
  """Checks every setting, then measures and plots the models the parsed flags name."""
  with cli.usage_errors():
    check_settings([fv.model, *fv.compare], fv.batch, fv.image_size, fv.activation,
                   fv.skip_gain, fv.yscale)
    _check_out(fv.out)
  png, csv_path, profiles = run(fv.model, fv.compare, fv.out, fv.batch, fv.image_size,
                                fv.activation, fv.skip_gain, fv.seed, fv.yscale)
  for p in profiles:
    print(f"{p.label()}: {p.num_blocks} blocks, average channel variance "
          f"{p.avg_var.min():.3g}..{p.avg_var.max():.3g}, skip gains set: {p.skip_gains_set}"
          + (f", branch-end conv gains set: {p.branch_end_gains_set}"
             if p.branch_end_gains_set else ""))
  print(f"Wrote {png} and {csv_path}")


if __name__ == "__main__":
  cli.run(main)
