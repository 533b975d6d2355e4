"""Fine-tuning: `init_from`, `freeze`, the class subset and experiments/finetune.py.

Weights are random values in `nfnet:nano`'s real parameter tree (no
initialiser is compiled where none is needed); files are real `.npz` files,
published names come over a real HTTP server (tests/test_weights.py's), and
the train step is the trainer's own, compiled for nano at 24 px.
"""

import hashlib
import importlib.util
import pathlib
import re
import types

import dill
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets_jax import models, optim, weights
from nfnets_jax.weights import download
from nfnets_jax.data import subsets
from nfnets_jax.models.stacking import StackedLayout
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import freeze, init_from, steps
from data_helpers import digits_data_dir  # noqa: F401  (fixture)
from test_weights import Server

REPO = pathlib.Path(__file__).parents[1]
NANO = "nfnet:nano"
HEAD = ("NFNet/~/linear/b", "NFNet/~/linear/w")
LINEAR_PROBE = "^(?!NFNet/~/linear/)"
SIZE = 24


def _values(num_classes: int, seed: int) -> dict:
  """Random float32 values in nano's published tree for `num_classes`."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32),
                                models.param_shapes(NANO, num_classes))


def _flat(tree) -> dict:
  return {f"{m}/{n}": np.asarray(v) for m, group in tree.items() for n, v in group.items()}


# ----------------------------------------------------------------------------- init_from


def test_a_mismatched_parameter_is_named_with_both_shapes():
  fresh = models.param_shapes(NANO, 5)
  loaded = _values(5, seed=0)
  loaded["NFNet/~/stem_conv0"]["w"] = np.zeros((3, 3, 3, 8), np.float32)
  del loaded["NFNet/~/nf_block"]["skip_gain"]
  with pytest.raises(weights.ParameterMismatchError) as err:
    init_from.plan("other.npz", loaded, fresh)
  message = str(err.value)
  assert "NFNet/~/stem_conv0/w: checkpoint (3, 3, 3, 8), model (3, 3, 3, 16)" in message
  assert "missing" in message and "NFNet/~/nf_block/skip_gain ()" in message
  assert "config.init_from = 'other.npz'" in message
  assert err.value.mismatched == [("NFNet/~/stem_conv0/w", (3, 3, 3, 8), (3, 3, 3, 16))]


def test_an_unreadable_init_from_is_one_config_error(tmp_path):
  missing = str(tmp_path / "missing.npz")
  with pytest.raises(init_from.InitFromError,
                     match=f"config.init_from = '{re.escape(missing)}': No checkpoint at"):
    init_from.prepare(missing, models.param_shapes(NANO, 5))
  assert issubclass(init_from.InitFromError, config_lib.ConfigError)  # one line from the trainer


def test_the_classifier_is_reinitialised_for_other_num_classes_and_the_rest_loaded(tmp_path):
  source = _values(10, seed=1)
  path = weights.save_params_npz(source, tmp_path / "pretrained.npz")
  fresh = _values(5, seed=2)
  prepared = init_from.prepare(str(path), fresh)
  plan = prepared.plan
  params = init_from.merge(prepared.loaded, fresh, plan)
  assert plan.reinitialised == HEAD
  assert len(plan.loaded) == len(_flat(fresh)) - 2
  got, want_source, want_fresh = _flat(params), _flat(source), _flat(fresh)
  for key, value in got.items():
    np.testing.assert_array_equal(value, want_fresh[key] if key in HEAD else want_source[key])
  assert "re-initialised 2 (the classifier: NFNet/~/linear/b, NFNet/~/linear/w)" in \
      init_from.describe(plan)
  # The same number of classes: the classifier loads too, unless told otherwise.
  assert init_from.plan("x", source, models.param_shapes(NANO, 10)).reinitialised == ()
  assert init_from.plan("x", source, models.param_shapes(NANO, 10),
                        reinit_classifier=True).reinitialised == HEAD


@pytest.mark.slow
def test_published_names_load_from_a_local_mirror(tmp_path, monkeypatch):
  """`init_from='published:F0'` for a 5-class F0: the file comes from
  $NFNETS_JAX_WEIGHTS_URL (a real HTTP server here), is checked against the
  table's MD5 and read as a pickle without running code, the classifier is
  re-initialised. The file is published-format (a dill pickle of F0's tree) but
  holds a constant per parameter, so the table's F0 entry is pointed at it."""
  shapes = models.param_shapes("nfnet:F0", 1000)
  source, count = {}, 0
  for module, group in shapes.items():
    for name, leaf in group.items():
      count += 1
      source.setdefault(module, {})[name] = np.full(leaf.shape, count, np.float32)
  body = dill.dumps(source)
  monkeypatch.setitem(download.PUBLISHED, "F0", download.PublishedFile(
      "F0", "F0_haiku.npz", hashlib.md5(body).hexdigest(), 83.6))
  fresh = models.param_shapes("nfnet:F0", 5)
  with Server() as server:
    server.files["/F0_haiku.npz"] = body
    del body
    monkeypatch.setenv(download.URL_ENV, server.url)
    monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    loaded = init_from.load("published:F0", ema=False)
    assert server.requests["/F0_haiku.npz"] == 1
  plan = init_from.plan("published:F0", loaded, fresh)
  assert plan.reinitialised == HEAD
  assert len(plan.loaded) == sum(len(group) for group in fresh.values()) - 2
  params = init_from.merge(loaded, fresh, plan)
  for key in plan.loaded[::7]:
    module, name = key.rsplit("/", 1)
    np.testing.assert_array_equal(params[module][name], source[module][name])
  assert params["NFNet/~/linear"]["w"].shape == (3072, 5)


def test_init_from_fills_a_stacked_train_state_from_the_published_tree():
  """Files hold the published tree; a scanning model's state is stacked (one
  array for a run of blocks): each block's weights land in its slice."""
  layout = StackedLayout([["M/~/block", "M/~/block_1"]])
  fresh = {"M/~/block": {"w": np.zeros((2, 2), np.float32)},
           "M/~/block_1": {"w": np.zeros((2, 2), np.float32)},
           "M/~/linear": {"w": np.zeros((2, 3), np.float32)}}
  loaded = {"M/~/block": {"w": np.full((2, 2), 1.0)}, "M/~/block_1": {"w": np.full((2, 2), 2.0)},
            "M/~/linear": {"w": np.ones((2, 4))}}
  prepared = init_from.Prepared(loaded, init_from.plan("src", loaded, fresh))
  state = types.SimpleNamespace(params=jax.tree_util.tree_map(jnp.asarray, layout.stack(fresh)))
  params = init_from.initial_state(state, prepared, layout=layout,
                                   state_from_params=lambda p: p)
  assert sorted(params) == ["M/~/block__x2", "M/~/linear"]
  np.testing.assert_array_equal(params["M/~/block__x2"]["w"],
                                np.stack([np.full((2, 2), 1.0), np.full((2, 2), 2.0)]))
  assert params["M/~/block__x2"]["w"].dtype == np.float32
  np.testing.assert_array_equal(params["M/~/linear"]["w"], np.zeros((2, 3)))  # re-initialised


# ----------------------------------------------------------------------------- freeze


def _stacked_example():
  """A tree with a run of three blocks stacked as `M/~/block__x3` (the real layout class)."""
  layout = StackedLayout([["M/~/block", "M/~/block_1", "M/~/block_2"]])
  sds = jax.ShapeDtypeStruct
  shapes = {"M/~/stem": {"w": sds((3, 3, 3, 4), jnp.float32)},
            "M/~/block__x3": {"skip_gain": sds((3,), jnp.float32)},
            "M/~/block__x3/~/conv": {"w": sds((3, 1, 1, 4, 4), jnp.float32),
                                     "b": sds((3, 4), jnp.float32)},
            "M/~/linear": {"w": sds((4, 2), jnp.float32), "b": sds((2,), jnp.float32)}}
  return layout, shapes


def test_freeze_matches_published_paths_and_whole_stacked_runs():
  layout, shapes = _stacked_example()
  split = freeze.param_split("/~/block.*/conv", shapes, layout)
  assert split.frozen == {("M/~/block__x3/~/conv", "w"), ("M/~/block__x3/~/conv", "b")}
  assert freeze.param_split("^(?!M/~/linear/)", shapes, layout).frozen == {
      ("M/~/stem", "w"), ("M/~/block__x3", "skip_gain"), ("M/~/block__x3/~/conv", "w"),
      ("M/~/block__x3/~/conv", "b")}
  with pytest.raises(freeze.FreezeError, match=(
      r"matches M/~/block_1/~/conv/(w|b) but not M/~/block/~/conv/\1, which are one stacked "
      r"array \(M/~/block__x3/~/conv/\1\)")):
    freeze.param_split("block_1/~/conv", shapes, layout)
  with pytest.raises(freeze.FreezeError, match="matches no parameter path; paths look like"):
    freeze.param_split("__x3", shapes, layout)  # the stacked name is not a published path
  with pytest.raises(freeze.FreezeError, match="matches all 6 parameters"):
    freeze.param_split("M/", shapes, layout)
  assert isinstance(freeze.FreezeError("x"), config_lib.ConfigError)  # one line from the trainer


def test_agc_inside_optax_multi_transform_with_frozen_labels():
  """The optax seam for callers who do compute every gradient: the NFNet optimizer
  (AGC recording its clip fraction) on the trainable labels, `set_to_zero` on the
  frozen ones. AGC sees only the trainable leaves and keeps no state for the rest."""
  rng = np.random.default_rng(5)
  params = {module: {name: rng.standard_normal(shape).astype(np.float32)
                     for name, shape in group.items()}
            for module, group in {"net/~/stem": {"w": (3, 3, 3, 4), "b": (4,)},
                                  "net/~/block": {"w": (3, 3, 4, 4), "gain": (4,)},
                                  "net/~/linear": {"w": (4, 2), "b": (2,)}}.items()}
  labels = optim.groups.map_params(lambda m, n: "frozen" if "stem" in m else "train", params)
  opt = optax.multi_transform(
      {"train": optim.nfnet_optimizer(0.1, clipping=0.01, record_clip_fraction=True),
       "frozen": optax.set_to_zero()}, labels)
  state = opt.init(params)
  grads = jax.tree_util.tree_map(lambda p: 3.0 * np.ones_like(p), params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  for key, update in _flat(updates).items():
    assert bool(np.any(update != 0)) == ("stem" not in key), key
  fraction = float(optim.agc_clip_fraction(state))
  assert 0.0 < fraction <= 1.0
  trace = optax.tree_utils.tree_get(state, "trace")
  traced = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trace)[0]]
  assert len(traced) == sum(1 for key in _flat(params) if "stem" not in key)
  assert not any("stem" in path for path in traced)


# ----------------------------------------------------------------------------- data subset


@pytest.mark.slow
def test_class_subset_relabels_and_takes_the_first_examples_of_each_class(digits_data_dir):
  from nfnets_jax.data.sources import open_source  # pylint: disable=import-outside-toplevel
  source = open_source("digits", "train", data_dir=digits_data_dir)
  # pylint: disable-next=protected-access
  stored = list(subsets._names_and_labels(source, "train", 0, 1))
  want = {name: {7: 0, 2: 1}[label] for label in (7, 2)
          for name in [n for n, lab in stored if lab == label][:3]}
  subset = subsets.restrict(source, "7,2", 3)
  assert subset.num_classes == 2 and subset.num_examples("train") == 6
  for seed in (0, 1):
    ds, size = subset.read("train", process_index=0, process_count=1, shuffle_files=True,
                           seed=seed)
    got = {bytes(ex["name"]): int(ex["label"]) for ex in ds.as_numpy_iterator()}
    assert got == want and size == 6
  parts = [subset.read("train", process_index=i, process_count=2, shuffle_files=False, seed=None)
           for i in range(2)]
  assert subset.part_sizes("train", 2) == [size for _, size in parts]
  assert {bytes(ex["name"]) for ds, _ in parts for ex in ds.as_numpy_iterator()} == set(want)
  with pytest.raises(ValueError, match=r"classes \[12\] are not classes of dataset 'digits', "
                     r"which has classes 0..9"):
    subsets.restrict(source, "3,12")


@pytest.mark.parametrize("classes, message", [
    ("5-3", "runs backwards"), ("5,5", r"class\(es\) \[5\] more than once"),
    ("five", "'five' is not a class index or a range")])
def test_bad_class_lists_are_named(classes, message):
  with pytest.raises(ValueError, match=message):
    subsets.parse_classes(classes)


# ----------------------------------------------------------------------------- config


def _finetune_config(model: str):
  spec = importlib.util.spec_from_file_location("finetune", REPO / "experiments" / "finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(model)


def test_finetune_config_fits_clipping_to_the_batch_and_ema_to_the_run():
  config = _finetune_config("nfnet:F0")
  assert config.init_from == "published:F0" and config.dataset.augment_name is None
  assert config.optimizer.clipping == pytest.approx(0.01 * (4096 / 512) ** 0.5)
  config.train_batch_size, config.num_train_steps = 4096, 500  # as --config.<field>= sets them
  assert config.optimizer.clipping == pytest.approx(0.01)
  assert config.ema_decay == pytest.approx(0.98)
  assert _finetune_config(NANO).init_from is None  # no published nano weights
  with pytest.raises(ValueError, match="takes an NFNet"):
    _finetune_config("nf_resnet:ResNet50")


@pytest.mark.parametrize("steps, decay", [(1, 0.0), (9, 0.0), (10, 0.0), (20, 0.5),
                                         (2000, 0.995), (-1, 0.0)])
def test_finetune_ema_default_is_valid_for_every_step_count(steps, decay):
  """max(0, 1 - 10 / steps): no average (0) for runs of 10 steps or fewer and for
  epochs (-1), where 1 - 10 / steps alone would be an ema_decay the user never set."""
  config = _finetune_config(NANO)
  config.num_train_steps = steps  # as --config.num_train_steps= sets it
  assert config_lib.validate(config).ema_decay == pytest.approx(decay)


@pytest.mark.parametrize("field, message", [
    ("num_train_steps", "config.num_train_steps = 0 is invalid: expected -1 (use num_epochs) or"),
    ("train_batch_size", "config.train_batch_size = 0 is invalid: expected a positive integer")])
def test_a_zero_that_a_default_divides_by_is_named_itself(field, message):
  """ema_decay and clipping follow these fields; a 0 is named, not a ZeroDivisionError."""
  config = _finetune_config(NANO)
  config[field] = 0
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


@pytest.mark.parametrize("value", [-0.5, 1.0])
def test_a_bad_ema_decay_set_by_the_user_is_named_with_its_range(value):
  config = _finetune_config(NANO)
  config.ema_decay = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      f"config.ema_decay = {value} is invalid: expected a number in [0, 1).")):
    config_lib.validate(config)


@pytest.mark.parametrize("fields, message", [
    ({"dataset.classes": "5-9"}, "config.num_classes = 1000 is invalid: expected 5"),
    ({"freeze": "linear("}, "config.freeze = 'linear(' is invalid: expected a Python regular"),
    ({"dataset.train_examples_per_class": -1}, "config.dataset.train_examples_per_class = -1"),
    ({"dataset.classes": "a-b"}, "config.dataset.classes: classes 'a-b'")])
def test_bad_finetuning_fields_are_named(fields, message):
  config = config_lib.base_config()
  config.update_from_flattened_dict(fields)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message) if "(" in message
                     else message):
    config_lib.finalize(config)


# ----------------------------------------------------------------------------- trainer


@pytest.mark.slow
def test_a_finetune_starts_from_init_from_trains_unfrozen_only_and_resumes_its_own_state(
    digits_data_dir, tmp_path):
  """The experiment starts from `init_from` (classifier re-initialised for 3
  classes); two of its train steps leave the frozen parameters and their EMA bit
  for bit, with no optimizer state for them; once its workdir holds a checkpoint
  it restores that: a second run whose `init_from` no longer exists resumes it."""
  from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel
  source = _values(10, seed=6)
  path = weights.save_params_npz(source, tmp_path / "pretrained.npz")
  config = config_lib.base_config()
  config.update_from_flattened_dict({
      "model": NANO, "num_classes": 3, "dataset.name": "digits",
      "dataset.data_dir": digits_data_dir, "dataset.eval_split": "test",
      "dataset.classes": "4,0,8", "dataset.train_examples_per_class": 5,
      "dataset.image_size": SIZE, "dataset.train_preproc": "resize", "dataset.augment_name": None,
      "dataset.deterministic": True, "dataset.autotune": False, "train_batch_size": 5,
      "num_train_steps": 4, "optimizer.weight_decay": 1e-2, "compute_dtype": "float32",
      "async_checkpoints": False, "init_from": str(path), "freeze": "stem|NFNet/~/nf_block/",
      "model_kwargs.conv_impl": "xla"})  # XLA's own convolutions: quicker to compile
  config_lib.finalize(config)
  workdir = str(tmp_path / "run")
  run = experiment.Experiment(config, workdir)
  try:
    assert run.steps_per_epoch == 3  # 15 examples: 5 of each class, batch 5
    state = run.restore_or_init()
    start = _flat(jax.device_get(state.params))
    for key, value in _flat(source).items():
      if key not in HEAD:
        np.testing.assert_array_equal(start[key], value)
    assert start["NFNet/~/linear/w"].shape == (256, 3)
    frozen = {f"{m}/{n}" for m, n in run.split.frozen}
    assert len(frozen) == 4 * 3 + 1 + 5 * 3 + 2 * 2  # the stem's 4 convs, the first block
    opt_paths = [jax.tree_util.keystr(p) for p, leaf in
                 jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if np.ndim(leaf)]
    assert opt_paths and not any("stem" in p or "nf_block'" in p or "nf_block/" in p
                                 for p in opt_paths)
    batches = run._train_batches(0)  # pylint: disable=protected-access
    for _ in range(2):
      batch = next(batches)
      assert set(batch["labels"].tolist()) <= {0, 1, 2}
      state, metrics = run.train_step(state, steps.global_batch(run.mesh, batch))
    assert 0.0 <= float(metrics["agc_clip_fraction"]) <= 1.0
    after, ema = _flat(jax.device_get(state.params)), _flat(jax.device_get(state.ema.ema))
    for key in frozen:
      np.testing.assert_array_equal(after[key], start[key], err_msg=key)
      np.testing.assert_array_equal(ema[key], start[key], err_msg=key)
    for key in (*HEAD, "NFNet/~/final_conv/w", "NFNet/~/nf_block_1/skip_gain"):
      assert not np.array_equal(after[key], start[key]), key
    run.checkpointer.save(state, run._meta())  # pylint: disable=protected-access
    run.checkpointer.wait()
  finally:
    run.close()
  config.unlock()
  config.init_from = str(tmp_path / "gone.npz")
  resumed_run = experiment.Experiment(config_lib.finalize(config), workdir)
  try:
    resumed = resumed_run.restore_or_init()
  finally:
    resumed_run.close()
  assert int(resumed.step) == 2
  for key, value in after.items():
    np.testing.assert_array_equal(_flat(jax.device_get(resumed.params))[key], value)


@pytest.mark.slow
def test_the_documented_command_fine_tunes_published_f0_on_a_folder_of_jpegs(tmp_path,
                                                                             monkeypatch):
  """The README's fine-tuning path, at a small size: experiments/finetune.py:nfnet:F0
  with init_from='published:F0' (a published-format pickle served by a real HTTP
  mirror; the table's pinned MD5 is pointed at it, since no test file can match
  the real one) on `folder:<path>` with train/ and val/ class folders of real
  JPEGs. The run trains from the file's values (classifier re-initialised for 3
  classes), evaluates the val/ images and records the folder's class names."""
  from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel
  from data_helpers import write_folder  # pylint: disable=import-outside-toplevel
  classes = {"cat": 3, "dog": 3, "fox": 3}
  images = tmp_path / "images"
  write_folder(images / "train", classes)
  write_folder(images / "val", {name: 1 for name in classes}, seed=50)
  rng = np.random.default_rng(0)
  published = jax.tree_util.tree_map(
      lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32),
      models.param_shapes("nfnet:F0", 1000))
  body = dill.dumps(published)
  monkeypatch.setitem(download.PUBLISHED, "F0", download.PublishedFile(
      "F0", "F0_haiku.npz", hashlib.md5(body).hexdigest(), 83.6))
  spec = importlib.util.spec_from_file_location("finetune_config", REPO / "experiments/finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("nfnet:F0")
  assert config.init_from == "published:F0"
  config.unlock()
  # What the command line's --config.<field> flags set, shrunk to a CPU test.
  config.update_from_flattened_dict({
      "dataset.name": f"folder:{images}", "num_classes": 3, "train_batch_size": 3,
      "eval_batch_size": 3, "num_train_steps": 1, "dataset.image_size": 32,
      "dataset.eval_image_size": 32, "async_checkpoints": False, "compute_dtype": "float32",
      # XLA's own convolutions: the same numbers (tests/test_conv.py), F0 compiles faster.
      "model_kwargs.conv_impl": "xla"})
  with Server() as server:
    server.files["/F0_haiku.npz"] = body
    monkeypatch.setenv(download.URL_ENV, server.url)
    monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    run = experiment.Experiment(config_lib.finalize(config), str(tmp_path / "run"))
    assert server.requests["/F0_haiku.npz"] == 1
  try:
    results = run.train()
  finally:
    run.close()
  assert results["step"] == 1 and results["num_examples"] == 3
  assert 0.0 <= results["top1"] <= 1.0
  # One step in the warm-up barely moves the weights: they are the file's, not an init's.
  trained = _flat(weights.load_params(str(tmp_path / "run")))
  assert set(trained) == set(_flat(published))
  for key, value in _flat(published).items():
    if key not in HEAD:
      np.testing.assert_allclose(trained[key], value, atol=1e-3, err_msg=key)
  assert trained["NFNet/~/linear/w"].shape == (3072, 3)
  assert weights.load_meta(str(tmp_path / "run"))["class_names"] == ["cat", "dog", "fox"]
