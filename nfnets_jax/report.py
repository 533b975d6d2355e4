"""Size and cost of every model: parameters, and FLOPs at train and test resolution.

    python -m nfnets_jax.report [--format=table|markdown|json] [--families=nfnet,nf_resnet]
    python -m nfnets_jax.report --models=nfnet:F0,nfnet:F0+ --format=json
    python -m nfnets_jax.report --families=timm [--notimm_counts]
    python -m nfnets_jax.report --memory --devices=8 --per_device_batch=512 [--image_size=192]
        [--variants=F0,F7] [--grad_accum_steps=32]

`--memory` prints NFNet variants' per-device memory in training instead
(F0 by default, `--variants=all` for F0..F7): the compiled train step's peak,
replicated and sharded (`config.shard_state`), without and with gradient
accumulation, and the smallest accelerator (16, 24, 40, 80 GiB) it fits; see
`memory_rows`. Each row is printed as soon as it is compiled (minutes per
variant on a CPU), with a progress line on stderr for each compilation.

Every number is computed from the models themselves: parameters by tracing
each model's `init` abstractly (`registry.count_params`, no weights are
allocated), FLOPs from its `NetworkPlan` (`registry.count_flops`). FLOPs are
multiply-adds, the papers' convention. The NFNet paper's F0..F6 figures
(parameters, FLOPs at test resolution) are printed alongside with the relative
difference, so a drift in the architecture shows up here first.

timm's models (`timm:<name>`, family `timm`) are costed at timm's train and
test resolutions (its `input_size` and `test_input_size`), and timm's own
counts are measured next to ours in the same run when torch and timm (the
`peers` extra) are installed: its parameters (the `numel` of timm's model)
and the multiply-adds PyTorch's `FlopCounterMode` counts in a forward pass
at each resolution (its FLOPs halved), with the relative difference
(`timm_counts.py` says how; a child process does it, as timm must be
imported before JAX). Both sides count the same operations: the
multiply-adds of every convolution (squeeze-excite's two 1x1 convolutions
and ECA's 1-D convolution included) and of the classifier; neither counts
pooling, activations, biases, weight standardisation or the gates' products.
Without the peers, or with `--notimm_counts`, the timm columns say "not
measured" and why.

Without `--models`, every published variant of the selected families is
listed, which traces every large variant too (see docs/performance.md for
how long that takes).
"""

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from nfnets_jax import cli, timm_counts
from nfnets_jax.models import registry

#: Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
#: Normalization" (arXiv:2102.06171): parameters and FLOPs at each variant's
#: test resolution.
PUBLISHED: dict[str, tuple[float, float]] = {
    "nfnet:F0": (71.5e6, 12.38e9),
    "nfnet:F1": (132.6e6, 35.54e9),
    "nfnet:F2": (193.8e6, 62.59e9),
    "nfnet:F3": (254.9e6, 114.76e9),
    "nfnet:F4": (316.1e6, 215.24e9),
    "nfnet:F5": (377.2e6, 289.76e9),
    "nfnet:F6": (438.4e6, 377.28e9),
}
# timm's dm_nfnet_f0..f6 are the paper's F0..F6 (DeepMind's weights, the same test sizes).
PUBLISHED.update({f"timm:dm_nfnet_f{i}": PUBLISHED[f"nfnet:F{i}"] for i in range(7)})
#: Resolution for variants without published train/test sizes (the ResNets).
DEFAULT_IMSIZE = 224
FORMATS = ("table", "markdown", "json")


@dataclasses.dataclass(frozen=True)
class ModelCost:
  """One model's size and cost, with the published figures where there are any."""
  model: str
  family: str
  params: int
  train_size: int
  test_size: int
  train_flops: int
  test_flops: int
  published_params: Optional[float] = None
  published_test_flops: Optional[float] = None
  # timm's own counts (timm models only): `timm_counts` is None for other models,
  # MEASURED, or "not measured: <why>".
  timm_counts: Optional[str] = None
  timm_params: Optional[int] = None
  timm_train_flops: Optional[int] = None
  timm_test_flops: Optional[int] = None

  @property
  def params_diff_pct(self) -> Optional[float]:
    return _diff_pct(self.params, self.published_params)

  @property
  def test_flops_diff_pct(self) -> Optional[float]:
    return _diff_pct(self.test_flops, self.published_test_flops)

  @property
  def timm_diffs_pct(self) -> dict[str, Optional[float]]:
    """Our counts relative to timm's: params, train and test FLOPs (None where unmeasured)."""
    return {"timm_params_diff_pct": _diff_pct(self.params, self.timm_params),
            "timm_train_flops_diff_pct": _diff_pct(self.train_flops, self.timm_train_flops),
            "timm_test_flops_diff_pct": _diff_pct(self.test_flops, self.timm_test_flops)}

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "params_diff_pct": self.params_diff_pct,
            "test_flops_diff_pct": self.test_flops_diff_pct, **self.timm_diffs_pct}


def _diff_pct(ours: int, published: Optional[float]) -> Optional[float]:
  return None if published is None else 100.0 * (ours - published) / published


def image_sizes(name: str) -> tuple[int, int]:
  """(train, test) resolution of a variant; `DEFAULT_IMSIZE` where none is published."""
  family, variant = registry.parse_model_name(name)
  row = registry.FAMILIES[family].variants[variant]
  return row.get("train_imsize", DEFAULT_IMSIZE), row.get("test_imsize", DEFAULT_IMSIZE)


def model_cost(name: str) -> ModelCost:
  """Counts `name`'s parameters and FLOPs (1000 classes, as published)."""
  family, _ = registry.parse_model_name(name)
  train, test = image_sizes(name)
  published_params, published_flops = PUBLISHED.get(name, (None, None))
  return ModelCost(
      model=name, family=family, params=registry.count_params(name),
      train_size=train, test_size=test,
      train_flops=registry.count_flops(name, train, train)[1],
      test_flops=registry.count_flops(name, test, test)[1],
      published_params=published_params, published_test_flops=published_flops)


#: `ModelCost.timm_counts` of a timm row whose counts were measured.
MEASURED = "measured"


def with_timm_counts(rows: Sequence[ModelCost], measure: bool = True) -> list[ModelCost]:
  """`rows` with timm's own counts filled into every timm row, all measured in one
  child process (`timm_counts.measure_in_child`); "not measured" and why when
  `measure` is False or the peers are not installed."""
  timm_rows = [row for row in rows if row.family == "timm"]
  if not timm_rows:
    return list(rows)
  why = "--notimm_counts" if not measure else timm_counts.missing_peers()
  if why is not None:
    note = f"not measured: {why}"
    return [dataclasses.replace(row, timm_counts=note) if row.family == "timm" else row
            for row in rows]
  requests = sorted({(registry.parse_model_name(row.model)[1], size)
                     for row in timm_rows for size in (row.train_size, row.test_size)})
  counts = {(c.model, c.image_size): c for c in timm_counts.measure_in_child(requests)}

  def filled(row: ModelCost) -> ModelCost:
    if row.family != "timm":
      return row
    name = registry.parse_model_name(row.model)[1]
    train, test = counts[name, row.train_size], counts[name, row.test_size]
    return dataclasses.replace(row, timm_counts=MEASURED, timm_params=test.params,
                               timm_train_flops=train.macs, timm_test_flops=test.macs)

  return [filled(row) for row in rows]


def select_models(families: Optional[Sequence[str]] = None,
                  models: Optional[Sequence[str]] = None) -> list[str]:
  """The models to report: exactly `models`, or every published variant of `families` (default all)."""
  if families and models:
    raise ValueError("Give --families or --models, not both.")
  if models:
    for name in models:
      registry.parse_model_name(name)
    return list(models)
  valid = list(registry.FAMILIES)
  for family in families or ():
    if family not in registry.FAMILIES:
      raise ValueError(f"Unknown family {family!r}; valid families: {', '.join(valid)}.")
  chosen = families or valid
  return [name for name in registry.list_models(published_only=True)
          if name.partition(":")[0] in chosen]


def _millions(n: Optional[float]) -> str:
  return "-" if n is None else f"{n / 1e6:.2f}M"


def _billions(n: Optional[float]) -> str:
  return "-" if n is None else f"{n / 1e9:.2f}B"


def _pct(p: Optional[float]) -> str:
  if p is None:
    return "-"
  return "0.00%" if abs(p) < 0.005 else f"{p:+.2f}%"  # no "-0.00%"


HEADER = ("model", "params", "train px", "train FLOPs", "test px", "test FLOPs",
          "paper params", "params diff", "paper test FLOPs", "FLOPs diff")
#: Columns added when a timm model is listed: timm's counts and ours relative to them.
TIMM_HEADER = ("timm params", "vs timm", "timm train FLOPs", "vs timm", "timm test FLOPs",
               "vs timm")
NOT_MEASURED = "not measured"


def _cells(row: ModelCost) -> tuple[str, ...]:
  return (row.model, _millions(row.params), str(row.train_size), _billions(row.train_flops),
          str(row.test_size), _billions(row.test_flops), _millions(row.published_params),
          _pct(row.params_diff_pct), _billions(row.published_test_flops),
          _pct(row.test_flops_diff_pct))


def _timm_cells(row: ModelCost) -> tuple[str, ...]:
  if row.timm_counts is None:
    return ("-",) * len(TIMM_HEADER)
  if row.timm_counts != MEASURED:
    return (NOT_MEASURED, "-") * 3
  diffs = row.timm_diffs_pct
  return (_millions(row.timm_params), _pct(diffs["timm_params_diff_pct"]),
          _billions(row.timm_train_flops), _pct(diffs["timm_train_flops_diff_pct"]),
          _billions(row.timm_test_flops), _pct(diffs["timm_test_flops_diff_pct"]))


def _table(rows: Sequence[ModelCost]) -> tuple[list[tuple[str, ...]], str]:
  """The header and cell rows (timm's columns only when a timm model is listed), and the note."""
  note = "\nFLOPs are multiply-adds for one image.\n"
  if not any(row.timm_counts is not None for row in rows):
    return [HEADER] + [_cells(row) for row in rows], note
  states = {row.timm_counts for row in rows} - {None}
  if MEASURED in states:
    note += ("timm's counts, measured in this run: the parameters of timm's model and "
             "PyTorch's FlopCounterMode on its forward pass (FLOPs / 2).\n")
  note += "".join(f"timm's counts {state}.\n" for state in sorted(states - {MEASURED}))
  return [HEADER + TIMM_HEADER] + [_cells(row) + _timm_cells(row) for row in rows], note


def check_table_format(fmt: str, name: str = "format") -> None:
  """A ValueError naming `fmt` and the valid formats, unless it is one of `FORMATS`."""
  if fmt not in FORMATS:
    raise ValueError(f"Unknown {name} {fmt!r}; valid formats: {', '.join(FORMATS)}.")


def render(rows: Sequence[ModelCost], fmt: str = "table") -> str:
  """`rows` as an aligned text table, a Markdown table or JSON (a list of objects, raw counts)."""
  check_table_format(fmt)
  if fmt == "json":
    return json.dumps([row.as_dict() for row in rows], indent=2)
  cells, note = _table(rows)
  columns = len(cells[0])
  if fmt == "markdown":
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (columns - 1)) + "|")
    return "\n".join(lines) + "\n" + note
  widths = [max(len(c[i]) for c in cells) for i in range(columns)]
  lines = ["  ".join(text.ljust(width) if i == 0 else text.rjust(width)
                     for i, (text, width) in enumerate(zip(c, widths))).rstrip() for c in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines) + "\n" + note


# ----------------------------------------------------------------------------- memory

#: Accelerator memory sizes the memory report checks the peak against, GiB.
ACCELERATORS_GIB = (16, 24, 40, 80)
#: Default micro-batch of the memory report's accumulation columns.
DEFAULT_MICRO_BATCH = 16
#: Set in the child process the memory report starts with enough host devices.
_CHILD_ENV = "NFNETS_JAX_MEMORY_REPORT_CHILD"


def smallest_fit(peak_bytes: int) -> str:
  """The smallest of `ACCELERATORS_GIB` holding `peak_bytes`, as '40 GiB', or 'none'."""
  for size in ACCELERATORS_GIB:
    if peak_bytes <= size * 2 ** 30:
      return f"{size} GiB"
  return "none"


def memory_rows(variants: Sequence[str], per_device_batch: int, grad_accum_steps: int,
                image_size: Optional[int] = None, mesh: Any = None,
                progress: Optional[Callable[[str], None]] = None) -> Iterator[dict[str, Any]]:
  """`train.memory.train_step_memory` of each `nfnet:<variant>` on `mesh`, each row as soon
  as its step is compiled: replicated then sharded, with one micro-batch and (if
  `grad_accum_steps` > 1) with that many. `progress` is told what compiles next.

  `image_size` None: each variant's train resolution. Each row is a
  `StepMemory` dict plus `fits`, the smallest accelerator the peak fits.
  """
  from nfnets_jax.train import memory  # pylint: disable=import-outside-toplevel  (jax-heavy)
  settings = [(variant if ":" in variant else f"nfnet:{variant}", accum, shard)
              for variant in variants for accum in sorted({1, grad_accum_steps})
              for shard in (False, True)]
  for i, (name, accum, shard) in enumerate(settings):
    size = image_size or image_sizes(name)[0]
    if progress is not None:
      progress(f"compiling {i + 1}/{len(settings)}: {name} at {size} px, {per_device_batch} per "
               f"device, {accum} micro-batch{'es' if accum > 1 else ''}, "
               f"{'sharded' if shard else 'replicated'} state")
    row = memory.train_step_memory(name, mesh, per_device_batch, size, accum, shard)
    yield {**row.as_dict(), "fits": smallest_fit(row.peak_bytes)}


def memory_report(variants: Sequence[str], per_device_batch: int, grad_accum_steps: int,
                  image_size: Optional[int] = None, mesh: Any = None) -> list[dict[str, Any]]:
  """Every row of `memory_rows`, as a list."""
  return list(memory_rows(variants, per_device_batch, grad_accum_steps, image_size, mesh))


MEMORY_HEADER = ("model", "px", "batch/device", "accum", "state", "peak", "fits", "sharded state",
                 "sharded peak", "sharded fits")


def render_memory(rows: Sequence[dict[str, Any]], fmt: str = "table") -> str:
  """Memory rows (replicated then sharded, per setting) as a table, Markdown or JSON."""
  check_table_format(fmt)
  if fmt == "json":
    return json.dumps(list(rows), indent=2)
  cells = [MEMORY_HEADER] + [_memory_cells(replicated, sharded)
                             for replicated, sharded in zip(rows[::2], rows[1::2])]
  note = _memory_note(rows[0]["devices"] if rows else 0)
  if fmt == "markdown":
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(MEMORY_HEADER) - 1)) + "|")
    return "\n".join(lines) + "\n" + note
  widths = [max(len(c[i]) for c in cells) for i in range(len(MEMORY_HEADER))]
  lines = ["  ".join(text.ljust(width) if i == 0 else text.rjust(width)
                     for i, (text, width) in enumerate(zip(c, widths))).rstrip() for c in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines) + "\n" + note


def _memory_cells(replicated: dict[str, Any], sharded: dict[str, Any]) -> tuple[str, ...]:
  """One table row: a setting's replicated and sharded figures side by side."""
  gib = lambda n: f"{n / 2 ** 30:.2f}"  # noqa: E731
  return (replicated["model"], str(replicated["image_size"]), str(replicated["per_device_batch"]),
          str(replicated["grad_accum_steps"]), gib(replicated["state_bytes"]),
          gib(replicated["peak_bytes"]), replicated["fits"], gib(sharded["state_bytes"]),
          gib(sharded["peak_bytes"]), sharded["fits"])


def _memory_note(devices: int) -> str:
  return (f"\nPer device, GiB, on {devices} devices: XLA's memory analysis of the compiled "
          "train step (bfloat16 compute, float32 state). 'accum' is grad_accum_steps.\n")


def print_memory_rows(rows: Iterable[dict[str, Any]], fmt: str, devices: int,
                      names: Sequence[str]) -> None:
  """Prints memory rows as they come: each table or Markdown line once both halves of
  its setting are in (fixed column widths, as later rows are not known yet); JSON, a
  list, once all are."""
  check_table_format(fmt)
  if fmt == "json":
    print(json.dumps(list(rows), indent=2), flush=True)
    return
  widths = [max(len(header), 7) for header in MEMORY_HEADER]
  widths[0] = max([widths[0]] + [len(name) for name in names])

  def line(cells: Sequence[str]) -> str:
    if fmt == "markdown":
      return "| " + " | ".join(cells) + " |"
    return "  ".join(text.ljust(width) if i == 0 else text.rjust(width)
                     for i, (text, width) in enumerate(zip(cells, widths))).rstrip()

  print(line(MEMORY_HEADER), flush=True)
  print("|" + "|".join(["---"] + ["---:"] * (len(MEMORY_HEADER) - 1)) + "|" if fmt == "markdown"
        else "  ".join("-" * w for w in widths), flush=True)
  pending = None
  for row in rows:
    if pending is None:
      pending = row
      continue
    print(line(_memory_cells(pending, row)), flush=True)
    pending = None
  print(_memory_note(devices), end="", flush=True)


def _memory_from_flags(fv, argv: Sequence[str]) -> Optional[int]:
  """The memory report for the parsed flags, on `--devices` devices of this process or,
  with too few, in a child process given that many CPU host devices."""
  with cli.usage_errors():
    check_table_format(fv.format, "--format")
    if fv.devices < 1:
      raise ValueError(f"--devices={fv.devices} is invalid: expected a positive integer.")
    per_device = fv.per_device_batch or max(1, 4096 // fv.devices)
    accum = fv.grad_accum_steps or max(1, per_device // DEFAULT_MICRO_BATCH)
    if per_device < 1 or per_device % accum:
      raise ValueError(f"--grad_accum_steps={accum} is invalid: expected a divisor of "
                       f"--per_device_batch={per_device}.")
    if fv.image_size is not None and fv.image_size < 1:
      raise ValueError(f"--image_size={fv.image_size} is invalid: expected a positive integer.")
    variants = _memory_variants(fv.variants)
    for variant in variants:
      registry.parse_model_name(variant if ":" in variant else f"nfnet:{variant}")
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() < fv.devices:
    return _memory_in_child(fv.devices, argv)
  from nfnets_jax.train import steps  # pylint: disable=import-outside-toplevel
  mesh = steps.make_mesh(jax.devices()[:fv.devices])
  names = [v if ":" in v else f"nfnet:{v}" for v in variants]
  rows = memory_rows(variants, per_device, accum, fv.image_size, mesh, progress=_progress_line)
  print_memory_rows(rows, fv.format, fv.devices, names)
  return None


#: What `--memory` compiles without `--variants`: one variant, a few minutes on a CPU;
#: the others on request (`--variants=F0,F3` or `all`), each a few minutes more.
DEFAULT_MEMORY_VARIANTS = ("F0",)


def _memory_variants(flag: Optional[Sequence[str]]) -> list[str]:
  """The variants `--variants` names: DEFAULT_MEMORY_VARIANTS, a list, or 'all' (F0..F7)."""
  if not flag:
    return list(DEFAULT_MEMORY_VARIANTS)
  if list(flag) == ["all"]:
    return [v for v in registry.FAMILIES["nfnet"].variants
            if v.startswith("F") and not v.endswith("+")]
  return list(flag)


def _progress_line(text: str) -> None:
  print(f"memory report: {text} ...", file=sys.stderr, flush=True)


def _memory_in_child(devices: int, argv: Sequence[str]) -> int:
  """Runs this report again in a process with `devices` CPU host devices; its exit status."""
  if os.environ.get(_CHILD_ENV):
    raise ValueError(f"--devices={devices}: this process was started with that many CPU host "
                     "devices and has fewer.")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  # Its output is passed on line by line, as each row is ready (stderr, its progress,
  # goes straight through).
  with subprocess.Popen([sys.executable, "-m", "nfnets_jax.report", *argv[1:]], env=env,
                        stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      print(line, end="", flush=True)
  return proc.returncode


def _define_flags():
  """A private flag set: importing this module never clashes with other CLIs' flags."""
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("format", "table", f"Output format: {', '.join(FORMATS)}.", flag_values=fv)
  flags.DEFINE_list("families", None,
                    f"Families to list (default all): {', '.join(registry.FAMILIES)}.",
                    flag_values=fv)
  flags.DEFINE_list("models", None,
                    "Exact models to list instead, e.g. nfnet:F0,nfnet:F7+ (any variant).",
                    flag_values=fv)
  flags.DEFINE_bool("timm_counts", True, "Measure timm's own parameter and FLOP counts "
                    "next to every timm model's (needs the peers extra: torch, timm).",
                    flag_values=fv)
  flags.DEFINE_bool("memory", False, "Report per-device train-step memory instead.",
                    flag_values=fv)
  flags.DEFINE_integer("devices", 8, "--memory: devices the batch and the state are split "
                       "over (CPU host devices where this process has fewer).", flag_values=fv)
  flags.DEFINE_integer("per_device_batch", None, "--memory: examples per device and step "
                       "(default: 4096 / devices, the paper's batch).", flag_values=fv)
  flags.DEFINE_integer("image_size", None, "--memory: train resolution (default: each "
                       "variant's own).", flag_values=fv)
  flags.DEFINE_list("variants", None, "--memory: NFNet variants, e.g. F0,F3, or 'all' "
                    f"(F0..F7; default {','.join(DEFAULT_MEMORY_VARIANTS)}: each variant's "
                    "compiles take minutes on a CPU).", flag_values=fv)
  flags.DEFINE_integer("grad_accum_steps", None, "--memory: micro-batches of the accumulation "
                       f"columns (default: micro-batches of {DEFAULT_MICRO_BATCH}).",
                       flag_values=fv)
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Prints the report for `argv` (program name first, as in `sys.argv`); returns the exit code.

  Exit statuses as `nfnets_jax.cli` documents them: bad flags or values exit
  with 2 and a message naming the value and the valid choices.
  """
  fv = _define_flags()
  argv = list(sys.argv if argv is None else argv)
  return cli.run_tool(argv, fv, __doc__ or "", lambda _: (
      _memory_from_flags(fv, argv) if fv.memory else _report_from_flags(fv)))


def _report_from_flags(fv) -> None:
  """Prints the models the parsed flags select, in the format they ask for."""
  with cli.usage_errors():
    check_table_format(fv.format, "--format")
    names = select_models(fv.families, fv.models)
  rows = with_timm_counts([model_cost(name) for name in names], fv.timm_counts)
  print(render(rows, fv.format))


if __name__ == "__main__":
  cli.run(main)
