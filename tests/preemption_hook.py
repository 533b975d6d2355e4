"""The trainer (`python -m nfnets_jax.train`), sending itself a real SIGTERM at a chosen moment.

Run like the trainer, as a script or `-m preemption_hook` (launch/local.py's
`module`), with the moment in the environment:

  NFNETS_TEST_SIGNAL=step:K   right after step K is dispatched (while it computes)
  NFNETS_TEST_SIGNAL=save:K   right after the asynchronous save of step K started,
                              then a second signal (SIGINT) while it is written
  NFNETS_TEST_SIGNAL=eval:1   after the first batch of the run's first evaluation
  NFNETS_TEST_SIGNAL=stuck:K  right after step K is dispatched, then that step never
                              returns (a stuck input pipeline or device, as a blocked
                              wait of the main thread)
  NFNETS_TEST_SIGNAL_PROCESS  which process signals itself (default 0)
  NFNETS_TEST_MIN_GRACE       the stop's minimum grace period, seconds (with a grace
                              factor of 0: exactly that; default the trainer's own)

So tests/test_preemption.py interrupts at exact moments instead of guessing
with sleeps. Everything else is the trainer unchanged.
"""

import functools
import os
import signal
import threading

import jax

from nfnets_jax.train import __main__ as trainer
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import experiment as experiment_lib
from nfnets_jax.train import preemption
from nfnets_jax import cli


def _signal_self(*signums: int) -> None:
  for signum in signums:
    os.kill(os.getpid(), signum)


class SignalledExperiment(experiment_lib.Experiment):
  """The experiment, with the one method of the chosen moment wrapped to signal."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    moment, at = os.environ["NFNETS_TEST_SIGNAL"].split(":")
    if jax.process_index() != int(os.environ.get("NFNETS_TEST_SIGNAL_PROCESS", "0")):
      return
    at = int(at)
    if moment in ("step", "stuck"):
      step_fn = self.train_step

      def train_step(state, batch):
        step = int(jax.device_get(state.step)) + 1  # read before the state is donated
        out = step_fn(state, batch)
        if step == at:
          _signal_self(signal.SIGTERM)
          if moment == "stuck":
            threading.Event().wait()  # never set: the step never returns
        return out
      self.train_step = train_step
    elif moment == "save":
      save_fn = self.checkpointer.save

      def save(state, meta):
        save_fn(state, meta)
        if int(jax.device_get(state.step)) == at:
          _signal_self(signal.SIGTERM, signal.SIGINT)
      self.checkpointer.save = save
    elif moment == "eval":
      eval_fn, calls = self.eval_step, []

      def eval_step(named, batch):
        out = eval_fn(named, batch)
        calls.append(1)
        if len(calls) == at:
          _signal_self(signal.SIGTERM)
        return out
      self.eval_step = eval_step
    else:
      raise ValueError(f"NFNETS_TEST_SIGNAL={moment}:{at}: expected step:K, stuck:K, save:K "
                       "or eval:K")


experiment_lib.Experiment = SignalledExperiment
if "NFNETS_TEST_MIN_GRACE" in os.environ:
  preemption.StopSignals = functools.partial(
      preemption.StopSignals, min_grace_s=float(os.environ["NFNETS_TEST_MIN_GRACE"]),
      grace_factor=0.0)

if __name__ == "__main__":
  config_lib.accept_none_overrides()
  cli.run(trainer.main, flags_parser=trainer.parse_flags)
