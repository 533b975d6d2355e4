"""`config.shard_state`: the sharding rule, config errors, and on CPU host devices
(tests/shard_state_script.py, fresh interpreters) the sharded step against the
replicated one, its per-device memory, and checkpoints restored 8 -> 4 -> 2.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nfnets_jax import models, optim
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import sharding, steps
from nfnets_jax.train.experiment import Experiment, check_shard_state
from session_share import once, session_root

SCRIPT = pathlib.Path(__file__).with_name("shard_state_script.py")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _shape(*shape):
  return jax.ShapeDtypeStruct(shape, np.float32)


# ----------------------------------------------------------------------------- the rule


def test_each_leaf_splits_its_largest_divisible_axis_and_small_or_indivisible_leaves_stay_whole():
  tree = {"NFNet/~/conv": {"w": _shape(3, 3, 64, 128), "b": _shape(128)},
          "NFNet/~/linear": {"w": _shape(1536, 1000)},
          "NFNet/~/odd": {"w": _shape(3, 3, 35, 37)},
          "NFNet/~/nf_block_3__x6/~/conv0": {"w": _shape(6, 1, 1, 1536, 768)},
          # The block axis is the largest one divisible by 8 here, and still kept whole.
          "NFNet/~/nf_block_9__x64/~/conv1": {"w": _shape(64, 3, 3, 8, 8)}}
  specs = sharding.state_specs(tree, 8)
  assert specs["NFNet/~/conv"]["w"] == P(None, None, None, "data")
  assert specs["NFNet/~/conv"]["b"] == P()  # 128 elements: below MIN_SHARD_SIZE
  assert specs["NFNet/~/linear"]["w"] == P("data")  # 1536 > 1000, both divisible
  assert specs["NFNet/~/odd"]["w"] == P()
  assert specs["NFNet/~/nf_block_3__x6/~/conv0"]["w"] == P(None, None, None, "data")
  assert specs["NFNet/~/nf_block_9__x64/~/conv1"]["w"] == P(None, None, None, "data")
  assert sharding.state_specs(tree, 1)["NFNet/~/linear"]["w"] == P()
  assert sharding.splits_any(tree, 8) and not sharding.splits_any({"a": _shape(3, 5, 7)}, 2)


def test_optimizer_state_and_ema_split_like_the_parameters():
  model = models.transform("nfnet:nano", 10)
  optimizer, ema = optim.nfnet_optimizer(0.1), optim.params_ema(0.99)
  mesh = steps.make_mesh(jax.devices()[:1])
  state = steps.abstract_state(model, optimizer, ema, (16, 16), mesh)
  specs = sharding.state_specs(state, 4)
  momentum = [leaf for leaf in jax.tree_util.tree_leaves(
      specs.opt_state, is_leaf=lambda x: isinstance(x, P))]
  params = jax.tree_util.tree_leaves(specs.params, is_leaf=lambda x: isinstance(x, P))
  assert specs.ema.ema == specs.params and specs.ema.count == P() and specs.step == P()
  # The momentum trace is one of the optimizer state's parameter-shaped trees.
  assert any(momentum[i:i + len(params)] == params for i in range(len(momentum)))
  assert any(spec != P() for spec in params)


# ----------------------------------------------------------------------------- config errors


def _demo_config(**fields):
  config = config_lib.base_config()
  config.model, config.num_classes = "nfnet:nano", 10
  config.dataset.name = "digits"
  for key, value in fields.items():
    config[key] = value
  return config


def test_sharding_one_device_is_a_config_error(tmp_path):
  assert jax.device_count() == 1
  config = _demo_config(shard_state=True, train_batch_size=8, eval_batch_size=8)
  with pytest.raises(config_lib.ConfigError, match=r"^config.shard_state = True needs more than "
                     r"one device \(there is 1\).*set it to False.$"):
    Experiment(config, str(tmp_path))


def test_a_state_with_nothing_to_split_is_a_config_error():
  """nfnet:nano on 5 devices: no array of 4096+ elements has a length divisible by 5."""
  config = _demo_config(shard_state=True)
  mesh = steps.make_mesh(jax.devices()[:1])
  state = steps.abstract_state(models.transform("nfnet:nano", 10), optim.nfnet_optimizer(0.1),
                               optim.params_ema(0.99), (16, 16), mesh)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config.shard_state = True has nothing to shard: no array of "
                           r"nfnet:nano's train state .* divisible by the 5 devices"):
    check_shard_state(config, 5, state)
  check_shard_state(config, 4, state)
  check_shard_state(_demo_config(), 1, state)  # off: nothing to check


# ----------------------------------------------------------------------------- on host devices


def _script(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
       str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _train_and_restore(out: pathlib.Path) -> dict:
  _script("train", 8, out)
  _script("restore", 4, out, 8)
  _script("restore", 2, out, 4)
  return {"out": str(out)}


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
  """Trained on 8 devices, restored onto 4, then that copy onto 2: once per session
  (session_share), not once per xdist worker that runs one of the tests below."""
  return pathlib.Path(once(session_root(tmp_path_factory) / "shard_state",
                           _train_and_restore)["out"])


def _load(path):
  with np.load(path) as data:
    return dict(data)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["sharded", "sharded_step"])
def test_the_sharded_step_computes_the_replicated_steps_values(runs, run):
  """Two steps with 2 micro-batches each; parameters gathered per use (the default) or
  once per step."""
  arrays = _load(runs / "train.npz")
  replicated = {k.partition("|")[2]: v for k, v in arrays.items() if k.startswith("replicated|")}
  sharded = {k.partition("|")[2]: v for k, v in arrays.items() if k.startswith(run + "|")}
  assert replicated.keys() == sharded.keys() and len(replicated) > 50
  for key, value in replicated.items():
    np.testing.assert_allclose(sharded[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
  report = json.loads((runs / "train.json").read_text())
  for key, value in report["replicated"]["metrics"].items():
    assert report[run]["metrics"][key] == pytest.approx(value, rel=1e-5), key
  assert report["replicated"]["specs"] == ["P()"]
  assert "P(None, None, None, 'data')" in report[run]["specs"]


@pytest.mark.slow
def test_per_device_state_falls_about_n_fold_in_the_compiled_step(runs):
  report = json.loads((runs / "train.json").read_text())
  replicated, sharded = report["replicated"], report["sharded"]
  # What each device holds: the rule's count, device 0's buffers and the
  # compiled step's arguments (state + this device's batch) agree.
  for run in (replicated, sharded):
    assert run["state_bytes_rule"] == run["state_bytes_device0"]
    assert run["argument_bytes"] - run["batch_bytes"] == pytest.approx(run["state_bytes_rule"],
                                                                       abs=64)
    # The new state is written over the donated old one.
    assert run["alias_bytes"] == pytest.approx(run["state_bytes_rule"], abs=64)
  whole = replicated["state_bytes_whole"]
  assert replicated["state_bytes_rule"] == whole
  # 8 devices: an eighth of the state each, but for nano's small replicated leaves.
  assert whole / 8 <= sharded["state_bytes_rule"] < 0.25 * whole
  assert sharded["argument_bytes"] < 0.25 * replicated["argument_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 2])
@pytest.mark.parametrize("target", ["replicated", "sharded"])
def test_checkpoints_restore_bitwise_onto_fewer_devices(runs, devices, target):
  saved = {k.partition("|")[2]: v for k, v in _load(runs / "train.npz").items()
           if k.startswith("sharded|")}
  restored = _load(runs / f"restore_{devices}_{target}.npz")
  assert bool(restored.pop("placed_as_target"))
  assert bool(restored.pop("sharded")) == (target == "sharded")
  assert restored.keys() == saved.keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)
