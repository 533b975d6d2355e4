"""The NFNet experiment: config -> data -> model -> optimizer -> step -> checkpoints/metrics.

`Experiment(config, workdir)` builds everything up front (so a bad config
fails before any compilation), then `train()` runs the loop: restore the
latest complete checkpoint or initialise, stream batches from where that step
left off, step, log, evaluate, checkpoint. `evaluate()` scores the raw and the
EMA weights on the eval split, every example exactly once.
"""

import hashlib
import json
import math
import os
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nfnets_jax import models, optim
from nfnets_jax.data import options
from nfnets_jax.train import checkpoint_recovery
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import freeze, init_from, preemption
from nfnets_jax.train import sharding, steps
from nfnets_jax.train.checkpoints import Checkpointer, checkpoint_dir
from nfnets_jax.train.eval_totals import EvalTotals
from nfnets_jax.train.reporting import Reporter
from nfnets_jax.train.state import TrainState


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient; the run stops without saving it."""


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model constructor's keyword arguments (unset placeholders dropped)."""
  return {key: value for key, value in config.model_kwargs.items() if value is not None}


def eval_record(dataset: ml_collections.ConfigDict) -> dict[str, Any]:
  """How this run evaluates, for the checkpoint's meta: the eval split of its dataset
  (paths made absolute, so the record works from any directory), at its eval size and
  preprocessing; `ema` False as the run's summary reports the raw weights' top-1 first."""
  data_dir = dataset.data_dir
  if data_dir and "://" not in data_dir:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  return {"dataset": options.absolute_dataset_name(dataset.name), "data_dir": data_dir, "val_fraction": dataset.val_fraction,
          "split": dataset.eval_split, "image_size": dataset.eval_image_size,
          "eval_preproc": dataset.eval_preproc, "normalization": dataset.normalization,
          "ema": False}


def params_fingerprint(params: Any) -> str:
  """A short hash of the parameter values (this process's replica).

  Printed at the end of a run, so that processes of one job, or a resumed and
  an uninterrupted run, can be checked for bitwise agreement.
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()[:16]


def check_shard_state(config: ml_collections.ConfigDict, num_devices: int,
                      state: Optional[TrainState] = None) -> None:
  """A ConfigError if `config.shard_state` asks to split the state over one device, or
  over `num_devices` where no array of `state` (shapes) would be split (`sharding`)."""
  if not config.shard_state:
    return
  if num_devices == 1:
    raise config_lib.ConfigError(
        "config.shard_state = True needs more than one device (there is 1): it splits the "
        "train state over the devices; set it to False.")
  if config.freeze:
    raise config_lib.ConfigError(
        f"config.shard_state = True with config.freeze = {config.freeze!r}: a train state "
        "with frozen parameters is not sharded yet; set one of them off.")
  if state is not None and not sharding.splits_any(state, num_devices):
    raise config_lib.ConfigError(
        f"config.shard_state = True has nothing to shard: no array of {config.model}'s train "
        f"state has {sharding.MIN_SHARD_SIZE} elements or more and an axis divisible by the "
        f"{num_devices} devices; set it to False.")


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """A ConfigError unless the batches split evenly over the devices and each device's
  share over the micro-batches (and `shard_state` fits the devices)."""
  for field in ("train_batch_size", "eval_batch_size"):
    if config[field] % num_devices:
      raise config_lib.ConfigError(
          f"config.{field} = {config[field]} must be divisible by the number of devices "
          f"({num_devices}: {jax.local_device_count()} per process x {jax.process_count()} "
          "processes).")
  per_device = config.train_batch_size // num_devices
  if per_device % config.grad_accum_steps:
    raise config_lib.ConfigError(
        f"config.grad_accum_steps = {config.grad_accum_steps} must divide each device's share "
        f"of the batch ({config.train_batch_size} / {num_devices} devices = {per_device}).")
  check_shard_state(config, num_devices)


def open_train_source(dataset: ml_collections.ConfigDict) -> Any:
  """The training dataset (its class subset), checked to have both splits now, not
  after hours of training (the eval split is read at the end)."""
  from nfnets_jax.data.sources import open_source  # pylint: disable=import-outside-toplevel
  from nfnets_jax.data.subsets import restrict  # pylint: disable=import-outside-toplevel
  try:
    source = restrict(open_source(dataset.name, dataset.train_split, data_dir=dataset.data_dir,
                                  val_fraction=dataset.val_fraction),
                      dataset.classes, dataset.train_examples_per_class or None)
  except (ValueError, FileNotFoundError) as err:
    raise config_lib.ConfigError(f"config.dataset: {err}") from None
  try:
    source.num_examples(dataset.eval_split)
  except ValueError as err:
    raise config_lib.ConfigError(f"config.dataset.eval_split: {err}") from None
  return source


def resolve_num_classes(config: ml_collections.ConfigDict, source: Any) -> int:
  """The classifier's size: `config.num_classes`, which must be the dataset's number of
  classes, or for 0 that number (said in the log). A head of another size would
  train on targets it cannot express, or predict classes the data never has."""
  found = source.num_classes
  dataset = config.dataset
  what = f"dataset {dataset.name!r}" + (f" with classes {dataset.classes!r}"
                                        if dataset.classes is not None else "")
  if config.num_classes == 0:
    names = ", ".join(source.class_names[:5]) + (", ..." if found > 5 else "")
    logging.info("config.num_classes = 0: the classifier has %d outputs, the classes of %s "
                 "(%s).", found, what, names)
    return found
  if config.num_classes != found:
    raise config_lib.ConfigError(
        f"config.num_classes = {config.num_classes} does not match {what}, which has {found} "
        f"classes: set config.num_classes = {found}, or 0 to take the dataset's number (a new "
        "classifier then has that many outputs).")
  return config.num_classes


def schedule_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int, int]:
  """(steps per epoch, total steps, warm-up steps) from the epochs or steps the config sets."""
  steps_per_epoch = max(1, num_train // config.train_batch_size)
  if config.num_train_steps > 0:
    total_steps = config.num_train_steps
  else:
    total_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
  warmup = (config.warmup_steps if config.warmup_steps >= 0
            else int(config.warmup_epochs * steps_per_epoch))
  return steps_per_epoch, total_steps, min(warmup, total_steps - 1)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The transformed model and its parameters' layout (scanned runs stacked, see
  models/stacking.py; checkpoint files hold the published tree)."""
  kwargs = model_kwargs(config)
  try:
    model = models.transform(config.model, num_classes, **kwargs)
  except TypeError as err:
    raise ValueError(f"config.model_kwargs {kwargs} do not fit {config.model}: {err}") from None
  return model, models.stacked_layout(config.model, num_classes, **kwargs)


def build_optimizer(config: ml_collections.ConfigDict, total_steps: int, warmup: int):
  """(learning-rate schedule, optimizer, EMA) of the config's recipe."""
  opt = config.optimizer
  schedule = optim.nfnet_lr_schedule(
      opt.base_lr, batch_size=config.train_batch_size, total_steps=total_steps,
      warmup_steps=warmup, min_lr=opt.min_lr, scale_by_batch=opt.scale_lr_by_batch)
  clipping = opt.clipping or None
  optimizer = optim.nfnet_optimizer(
      schedule, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay,
      clipping=clipping, eps=opt.eps, exclude_classifier_from_agc=opt.exclude_classifier_from_agc,
      record_clip_fraction=clipping is not None)
  return schedule, optimizer, optim.params_ema(config.ema_decay)


def step_config(config: ml_collections.ConfigDict, num_classes: int) -> steps.StepConfig:
  """What the train step takes from the config."""
  return steps.StepConfig(
      num_classes=num_classes, label_smoothing=config.label_smoothing,
      compute_dtype=jnp.dtype(config.compute_dtype), sam_rho=config.sam.rho,
      sam_ascent_fraction=config.sam.ascent_fraction,
      record_clip_fraction=bool(config.optimizer.clipping), grad_accum_steps=config.grad_accum_steps,
      shard_state=config.shard_state)


class Experiment:
  """One training/evaluation run of a config in a workdir (`write_summaries`: False for a
  read-only workdir evaluated in place: no TensorBoard scalars)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               write_summaries: bool = True):
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TF stays lazy)
    self._data = data
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = steps.make_mesh()
    num_devices = jax.device_count()
    check_batch_sizes(config, num_devices)
    self.local_train_batch = config.train_batch_size // jax.process_count()
    self.local_eval_batch = config.eval_batch_size // jax.process_count()
    self.image_shape = (config.dataset.image_size, config.dataset.image_size)
    self.compute_dtype = jnp.dtype(config.compute_dtype)

    source = open_train_source(config.dataset)
    self.class_names = source.class_names
    self.num_classes = resolve_num_classes(config, source)
    self.model, self.layout = build_model(config, self.num_classes)
    self.split = freeze.model_split(config.freeze, self.model, self.image_shape, self.layout)
    self.steps_per_epoch, self.total_steps, warmup = schedule_lengths(
        config, source.num_examples(config.dataset.train_split))
    self.schedule, self.optimizer, self.ema = build_optimizer(config, self.total_steps, warmup)
    if config.shard_state:
      check_shard_state(config, num_devices, self._abstract_state())
    self.train_step = steps.make_train_step(
        self.model, self.optimizer, self.ema, self.schedule, step_config(config, self.num_classes),
        self.mesh, jax.random.key(config.seed + 1), self.split)
    self.eval_step = steps.make_eval_step(self.model, self.num_classes, self.compute_dtype,
                                          self.mesh)
    self.checkpointer = Checkpointer(self.workdir, config.keep_checkpoints,
                                     config.async_checkpoints, self.layout)
    self.reporter = Reporter(self.workdir, self.total_steps, config.train_batch_size,
                             write=write_summaries)
    # Read and checked now, so a bad init_from fails before any compilation; used
    # only when the workdir has no checkpoint to resume.
    self._init_from = None
    if config.init_from is not None and self.checkpointer.latest_step() is None:
      self._init_from = init_from.prepare(
          config.init_from, models.param_shapes(config.model, self.num_classes,
                                                **model_kwargs(config)),
          ema=config.init_from_ema, reinit_classifier=config.reinit_classifier,
          normalization=config.dataset.normalization)

  # -- state -----------------------------------------------------------------

  def _abstract_state(self) -> TrainState:
    return steps.abstract_state(self.model, self.optimizer, self.ema, self.image_shape,
                                self.mesh, shard=self.config.shard_state, split=self.split)

  def restore_or_init(self) -> TrainState:
    """The newest readable checkpoint in the workdir (damaged newer ones are
    reported and set aside: checkpoint_recovery), or a freshly initialised state."""
    restored = checkpoint_recovery.restore_newest_readable(
        self.checkpointer, self._abstract_state(), self.mesh)
    if restored is None:
      logging.info("No checkpoint in %s; initialising %s.", checkpoint_dir(self.workdir),
                   self.config.model)
      state = steps.init_state(self.model, self.optimizer, self.ema,
                               jax.random.key(self.config.seed), self.image_shape, self.mesh,
                               shard=self.config.shard_state, split=self.split)
      if self._init_from is not None:  # only here: a resumed run restores its own state
        placement = jax.tree_util.tree_map(lambda leaf: leaf.sharding, state)
        state = init_from.initial_state(
            state, self._init_from, layout=self.layout, state_from_params=jax.jit(
                lambda p: steps.state_from_params(p, self.optimizer, self.ema, self.split),
                out_shardings=placement))
      return state
    state, _, step = restored
    logging.info("Resumed from step %d (%s).", step, checkpoint_dir(self.workdir))
    return state

  def _meta(self) -> dict[str, Any]:
    """What the tools need to rebuild and score the network as this run does (see
    `nfnets_jax.weights.loading`): the model, how its eval runs, its class names."""
    return {"model": self.config.model, "num_classes": self.num_classes,
            "model_kwargs": model_kwargs(self.config),
            "eval": eval_record(self.config.dataset), "class_names": list(self.class_names)}

  # -- data ------------------------------------------------------------------

  def _train_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    ds = self.config.dataset
    return self._data.load(
        ds.name, ds.train_split, is_training=True, batch_dims=(self.local_train_batch,),
        classes=ds.classes, examples_per_class=ds.train_examples_per_class or None,
        image_size=ds.image_size, augment_name=ds.augment_name,
        augment_before_mix=ds.augment_before_mix, mix_source=ds.mix_source,
        data_dir=ds.data_dir, val_fraction=ds.val_fraction, train_preproc=ds.train_preproc,
        normalization=ds.normalization, seed=self.config.seed if ds.deterministic else None,
        deterministic=ds.deterministic,
        start_step=start_step, autotune=ds.autotune)

  def _eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    ds = self.config.dataset
    return self._data.load(
        ds.name, ds.eval_split, is_training=False, batch_dims=(self.local_eval_batch,),
        classes=ds.classes,
        image_size=ds.eval_image_size, eval_preproc=ds.eval_preproc,
        normalization=ds.normalization, data_dir=ds.data_dir, val_fraction=ds.val_fraction,
        autotune=ds.autotune)

  # -- loop ------------------------------------------------------------------

  def _check_finite(self, metrics: dict[str, jax.Array], step: int) -> None:
    values = {key: float(metrics[key]) for key in ("loss", "grad_norm")}
    if not all(math.isfinite(v) for v in values.values()):
      self.checkpointer.wait()
      latest = self.checkpointer.latest_step()
      kept = (f"the last good checkpoint (step {latest}) in {checkpoint_dir(self.workdir)} is "
              "kept" if latest is not None else "no checkpoint had been saved yet")
      raise NonFiniteLossError(
          f"Non-finite training metrics at step {step}: {values}. Stopping; the state of this "
          f"step is not saved and {kept}. Lower config.optimizer.base_lr, check "
          "config.optimizer.clipping (AGC) and the input data, then resume.")

  def train(self, evaluate: bool = True,
            signals: Optional[preemption.StopSignals] = None) -> dict[str, Any]:
    """Trains to `total_steps` (resuming if possible).

    Returns the final step, a fingerprint of the parameters and, if
    `evaluate`, the eval metrics of the final weights. On SIGTERM/SIGINT every
    process stops at one step boundary, saves that step, waits for it and
    raises `preemption.Preempted` (see nfnets_jax/train/preemption.py).
    `signals`: the caller's active `StopSignals` (the trainer's covers its
    start-up too); None: its own, for the training only.
    """
    if signals is None:
      with preemption.StopSignals() as own:
        return self.train(evaluate, own)
    signals.checkpoint_dir = checkpoint_dir(self.workdir)
    return self._train(evaluate, signals, preemption.StopPoll(self.mesh, signals))

  def _train(self, evaluate: bool, signals: preemption.StopSignals,
             stop: preemption.StopPoll) -> dict[str, Any]:
    config = self.config
    state = self.restore_or_init()
    step = int(jax.device_get(state.step))
    saved_step = step if step else None  # a restored step is on disk already
    logging.info("Training %s for %d steps (%d per epoch), global batch %d on %d devices "
                 "(%d processes).", config.model, self.total_steps, self.steps_per_epoch,
                 config.train_batch_size, jax.device_count(), jax.process_count())
    batches = self._train_batches(step)
    signals.training_started()
    previous = None
    try:
      while step < self.total_steps:
        batch = steps.global_batch(self.mesh, next(batches))
        state, metrics = self.train_step(state, batch)
        # Checking the previous step's loss costs no time: the device is busy
        # with this step by now.
        if previous is not None:
          self._check_finite(previous, step)
        previous = metrics
        step += 1
        if step % config.log_every_steps == 0 or step == self.total_steps:
          self._check_finite(metrics, step)
          self.reporter.train_progress(step, jax.device_get(metrics))
        if step % config.checkpoint_every_steps == 0 or step == self.total_steps:
          self._check_finite(metrics, step)
          self.checkpointer.save(state, self._meta())
          saved_step = step
        if evaluate and config.eval_every_steps and step % config.eval_every_steps == 0 \
            and step != self.total_steps and self.evaluate(state, stop) is None:
          self._stop(state, metrics, saved_step, stop, "evaluation")
        # -- preemption: all processes agree to stop at this boundary
        if stop.poll():
          self._stop(state, metrics, saved_step, stop, "training")
    finally:
      batches.close()
      self.checkpointer.wait()
    results = self.evaluate(state, stop) if evaluate else {"step": step}
    if results is None:  # the final step's checkpoint is complete: a rerun only evaluates
      raise preemption.Preempted(step, stop.signal_name, checkpoint_dir(self.workdir),
                                 "the final evaluation")
    # Gathered whole (a sharded state's) so that every process hashes every value.
    results["params_fingerprint"] = params_fingerprint(
        jax.jit(self.layout.unstack_all, out_shardings=steps.replicated(self.mesh))(state.params))
    return results

  def _stop(self, state: TrainState, metrics: dict[str, jax.Array], saved_step: Optional[int],
            stop: preemption.StopPoll, during: str) -> None:
    """Saves `state` (unless its step is saved already), waits for it, raises Preempted."""
    step = int(jax.device_get(state.step))
    if saved_step != step:
      self._check_finite(metrics, step)
      self.checkpointer.save(state, self._meta())
    self.checkpointer.wait()
    preemption.all_processes_reached("checkpoint of the stop step complete")
    raise preemption.Preempted(step, stop.signal_name, checkpoint_dir(self.workdir), during)

  def evaluate(self, state: Optional[TrainState] = None,
               stop: Optional[preemption.StopPoll] = None) -> Optional[dict[str, float]]:
    """Top-1, top-5 and loss of the raw and the EMA weights over the whole eval split.

    Without `state`, of the newest readable checkpoint. With `stop`, polled
    after every batch: None when the job agreed to stop before the end.
    """
    if state is None:
      restored = checkpoint_recovery.restore_newest_readable(
          self.checkpointer, self._abstract_state(), self.mesh)
      if restored is None:
        raise FileNotFoundError(
            f"No checkpoint in {checkpoint_dir(self.workdir)} to evaluate; train first "
            "(--mode=train or train_eval).")
      state = restored[0]
    step = int(jax.device_get(state.step))
    start = time.perf_counter()
    named = {"": state.params, "ema_": state.ema.ema}
    totals = EvalTotals()
    for batch in self._eval_batches():
      totals.add(jax.device_get(self.eval_step(named, steps.global_batch(self.mesh, batch))))
      if stop is not None and stop.poll():
        logging.warning("Evaluation of step %d stopped before its end.", step)
        return None
    totals.require_examples("", f"{self.config.dataset.name!r} split "
                                f"{self.config.dataset.eval_split!r}")
    results = {"step": step}
    for prefix in named:
      results.update({prefix + key: mean for key, mean in totals.means(prefix).items()})
    results["num_examples"] = totals.count("")
    results["seconds"] = time.perf_counter() - start
    self.reporter.scalars("eval", step, {k: v for k, v in results.items() if k != "step"})
    logging.info("eval at step %d: %s", step, json.dumps(results))
    return results

  def close(self) -> None:
    self.checkpointer.close()
    self.reporter.close()
