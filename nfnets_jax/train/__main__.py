"""Train and/or evaluate an NFNet experiment.

  python -m nfnets_jax.train --config=experiments/demo.py --workdir=/tmp/demo
  python -m nfnets_jax.train --config=experiments/nfnet.py:F0 --workdir=gs://... \
      --config.train_batch_size=1024 --mode=train_eval

Any config field can be overridden with --config.<field>=<value>; a field that
does not exist is an error, and so is None (--config.<field>=None) for a field
that may not be None. The run resumes from the latest checkpoint in --workdir.
Multi-host jobs run this same command on every host (see launch/).

The log shows progress, warnings and errors; absl's --verbosity=0 (-v 0) adds
the libraries' info lines, -v 1 debug lines too (see nfnets_jax.cli).

Exit statuses: 0 done; 1 a bad flag, config value or experiment-file argument
(experiments/nfnet.py:F99), named in one line,
checkpoints that exist but none of which can be restored (each listed), or a
dataset split none of whose files can be read (they are named) or with no
example to evaluate;
3 the loss or gradients became non-finite (the last good checkpoint is kept);
4 a checkpoint could not be saved, or the workdir cannot be written (the line
names the directory and the cause; the earlier checkpoints are intact); 1 too
for a --workdir that is empty or a file; 75 stopped on SIGTERM/SIGINT
after saving the step it reached, or before the first step (nothing to save):
rerun the same command to resume (docs/training.md, "Preemption";
launch/slurm.sbatch requeues on it); 128 + the signal's number: a second
signal, or a step that could not finish after the first, ended the run
without saving the step it was in (the complete checkpoints are kept).
"""

import ast
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nfnets_jax import cli
from nfnets_jax.cli import runtime
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import workdir_access

#: Exit status of a run whose loss or gradients became non-finite.
EXIT_NON_FINITE = 3
#: Exit status of a run that could not save a checkpoint.
EXIT_SAVE_FAILED = 4

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/nfnet.py:F0.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
_MODE = flags.DEFINE_enum("mode", "train_eval", ["train", "eval", "train_eval"],
                          "train: train only; eval: evaluate the latest checkpoint; "
                          "train_eval: train, then evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an override of a config field that does not
  exist reported as one line naming the flag (ml_collections raises it as a
  chained AttributeError traceback from inside the parser), and so is an
  experiment file that cannot be read or refuses its argument."""
  try:
    rest = flags.FLAGS(argv)
  except OSError:  # an override applied to an experiment file that could not be read
    _exit_if_config_file_unreadable(argv)
    raise
  except flags.Error as err:  # e.g. --mode=fit: absl's message, without its traceback
    _exit_if_config_file_unreadable(argv)
    bad_config = _config_file_error(err, argv)
    if bad_config:
      sys.stderr.write(f"FATAL config error: {bad_config}\n")
    else:
      sys.stderr.write(f"FATAL Flags parsing error: {err}\n")
    sys.exit(cli.EXIT_FAILURE)
  except (AttributeError, KeyError) as err:
    detail = str(err.args[0]) if err.args else str(err)
    while detail[:1] in ("'", '"'):  # the message arrives quoted, once or twice
      try:
        detail = str(ast.literal_eval(detail))
      except (ValueError, SyntaxError):
        break
    name, _, hint = detail.partition("\n")
    name = name.strip("'\"")
    given = [arg.split("=", 1)[0] for arg in argv[1:]
             if arg.startswith("--config.") and name in arg.split("=", 1)[0]]
    where = f"{given[0]}: " if given else ""
    sys.stderr.write(f"FATAL Flags parsing error: {where}the config has no field {name!r}. "
                     f"{hint or 'See the experiment file for the fields it defines.'}\n")
    sys.exit(cli.EXIT_FAILURE)
  _exit_if_config_file_unreadable(argv)
  return rest


def _exit_if_config_file_unreadable(argv: list[str]) -> None:
  """Exits with one line when --config names a file that cannot be read.

  ml_collections defers that error to the config's first use (or to the first
  --config.<field> override), where it is a traceback of several lines.
  """
  try:
    value = config_flags.get_config_filename(flags.FLAGS["config"])
  except flags.Error:  # not parsed: its overrides failed, or --config is missing
    given = [arg.partition("=")[2] for arg in argv[1:] if arg.startswith("--config=")]
    if not given:
      return  # absl's own error says what is missing
    value = given[-1]
  path = value.split(":", 1)[0]
  if not (os.path.isfile(path) and os.access(path, os.R_OK)):
    sys.stderr.write(f"FATAL config error: --config={value}: no readable experiment file {path!r} "
                     f"(relative to {os.getcwd()}); expected a Python file with get_config(), "
                     "e.g. experiments/nfnet.py:F0\n")
    sys.exit(cli.EXIT_FAILURE)


def _config_file_error(err: Exception, argv: list[str]) -> str | None:
  """The one line for a bad `--config=<file>:<argument>`, else None (a bug in the file).

  ml_collections re-raises what the experiment file's `get_config` raised with
  its traceback as the message. A `ConfigError` (an unknown variant, a value
  `finalize` refuses) is reported as the other config errors are; a call that
  does not fit `get_config`'s signature (`experiments/demo.py:X`) names the flag.
  """
  original = err
  while original.__cause__ or original.__context__:
    original = original.__cause__ or original.__context__
  if isinstance(original, config_lib.ConfigError):
    return str(original)
  if isinstance(original, TypeError) and str(original).startswith("get_config()"):
    given = [arg for arg in argv[1:] if arg.startswith("--config=")]
    return (f"{given[-1] if given else '--config'}: {original} (the text after the file's "
            "':' is its get_config's argument)")
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    # Before runtime.setup and any import of the training stack: a bad value
    # is reported in a second or two, as one line naming the field.
    config = config_lib.validate(_CONFIG.value)
  except config_lib.ConfigError as err:
    _fatal_config_error(err)
  try:
    workdir = workdir_access.check(_WORKDIR.value, writes=_MODE.value != "eval")
  except workdir_access.WorkdirError as err:
    sys.stderr.write(f"FATAL {err}\n")
    sys.exit(err.exit_code)
  runtime.setup()
  from nfnets_jax.train import preemption  # pylint: disable=import-outside-toplevel
  # From here on a signal ends the start-up at once and, once training, stops at a
  # step boundary (preemption.StopSignals says what each moment does).
  with preemption.StopSignals() as signals:
    results = _run(config, workdir, signals)
  print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
  print(f"tensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
  if "top1" in results:
    print(f"eval top-1 {results['top1']:.4f} (EMA {results['ema_top1']:.4f}), "
          f"top-5 {results['top5']:.4f} on {results['num_examples']} examples at step "
          f"{results['step']}")
  print(json.dumps(results))


def _fatal_config_error(err: Exception) -> None:
  sys.stderr.write(f"FATAL config error: {err}\n")
  sys.exit(cli.EXIT_FAILURE)


def _run(config, workdir: str, signals) -> dict:
  """Builds the experiment and runs `--mode`; each failure the trainer knows ends the
  process with its line and exit status (see the module docstring)."""
  from nfnets_jax.data.integrity import UnreadableSplitError  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train import checkpoint_recovery, preemption  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train.eval_totals import NoExamplesError  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train.checkpoints import checkpoint_dir  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train.experiment import Experiment, NonFiniteLossError  # pylint: disable=import-outside-toplevel
  signals.checkpoint_dir = checkpoint_dir(workdir)
  write_summaries = _MODE.value != "eval" or workdir_access.is_writable(workdir)
  if not write_summaries:
    logging.warning("The workdir %s cannot be written: the evaluation's TensorBoard scalars "
                    "are not saved (the results are printed).", workdir)
  try:
    experiment = Experiment(config, workdir,  # checks what needs the devices
                            write_summaries=write_summaries)
  except config_lib.ConfigError as err:
    _fatal_config_error(err)
  try:
    if _MODE.value == "eval":
      signals.moment = "during the evaluation"
      results = experiment.evaluate()
    else:
      results = experiment.train(evaluate=_MODE.value == "train_eval", signals=signals)
  except NonFiniteLossError as err:
    logging.error("%s", err)
    experiment.close()
    sys.exit(EXIT_NON_FINITE)
  except preemption.Preempted as err:
    experiment.close()
    sys.stderr.write(f"{err}\n")
    sys.exit(preemption.EXIT_PREEMPTED)
  except checkpoint_recovery.CheckpointSaveError as err:
    experiment.reporter.close()
    sys.stderr.write(f"FATAL {err}\n")
    # Not experiment.close() nor a normal exit: orbax's threads of the failed
    # save wait minutes for a step directory that will never exist, and a
    # normal exit joins them.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_SAVE_FAILED)  # pylint: disable=protected-access
  except (checkpoint_recovery.NoReadableCheckpointError, UnreadableSplitError,
          NoExamplesError) as err:
    experiment.close()
    sys.stderr.write(f"FATAL {err}\n")
    sys.exit(cli.EXIT_FAILURE)
  experiment.close()
  return results


if __name__ == "__main__":
  config_lib.accept_none_overrides()
  cli.run(main, flags_parser=parse_flags)
