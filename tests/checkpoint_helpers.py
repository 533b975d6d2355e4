"""Small real train states and the orbax steps written from them, for the checkpoint tests.

Shared by tests/test_preemption.py and tests/test_checkpoint_faults.py (and the
latter's subprocess script): a state with the trainer's tree kinds, saved
through the trainer's own `Checkpointer`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.optim import EmaState
from nfnets_jax.train import steps
from nfnets_jax.train.checkpoints import Checkpointer
from nfnets_jax.train.state import TrainState

#: The state's parameter modules, each a w (32, 16) and a b (16,): 8 arrays in all.
LINEARS = tuple(f"net/~/linear_{i}" for i in range(4))


def small_state(step: int) -> TrainState:
  """A small train state of random values seeded by `step` (which no compression shrinks,
  and which differ from step to step), replicated on the default mesh."""
  mesh = steps.make_mesh()
  put = lambda x: jax.device_put(x, steps.replicated(mesh))  # noqa: E731
  rng = np.random.default_rng(step)
  params = {name: {"w": put(rng.standard_normal((32, 16)).astype(np.float32)),
                   "b": put(rng.standard_normal(16).astype(np.float32))}
            for name in LINEARS}
  return TrainState(step=put(jnp.asarray(step, jnp.int32)), params=params,
                    opt_state=(put(jnp.arange(5.0) * step),),
                    ema=EmaState(count=put(jnp.asarray(step, jnp.int32)), ema=params))


def abstract_target() -> TrainState:
  """The restore target of `small_state`: its shapes, dtypes and shardings."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), small_state(0))


def save_steps(workdir, *saved: int) -> Checkpointer:
  """A synchronous Checkpointer on `workdir` that has saved `small_state(step)` for each step."""
  checkpointer = Checkpointer(str(workdir), max_to_keep=5, async_save=False)
  for step in saved:
    checkpointer.save(small_state(step), {"model": "test"})
  return checkpointer
