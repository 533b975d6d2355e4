"""The stacked parameter layout (models/stacking.py) changes no value.

A model that scans runs of blocks gives its parameters stacked. Converting
to and from the published tree is lossless; AGC (which finds the block axis
by name), the optimizer state, the train step (gradients, optimizer, EMA,
metrics) and checkpoints give the same numbers in either layout; and
checkpoint files stay in the published layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models, optim, weights
from nfnets_jax.train import steps
from nfnets_jax.train.checkpoints import Checkpointer

# A small network with runs of 2, 3, 5 and 2 interchangeable blocks, all
# scanned (and so stacked) with block_loop='scan'; XLA's convolutions compile quicker.
NAME = "nf_resnet:ResNet50"
KWARGS = {"width": 1, "stochdepth_rate": 0.0, "drop_rate": 0.0, "block_loop": "scan",
          "conv_impl": "xla"}
NUM_CLASSES = 10
IMAGES = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
LABELS = jnp.arange(4) % NUM_CLASSES


@pytest.fixture(scope="module")
def scanned():
  """(model, layout, published params) with every run scanned; the params
  are random values in the published tree (no initialiser is compiled)."""
  layout = models.stacked_layout(NAME, NUM_CLASSES, **KWARGS)
  model = models.transform(NAME, NUM_CLASSES, **KWARGS)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, np.float32)),
      models.param_shapes(NAME, NUM_CLASSES, **KWARGS))
  return model, layout, params


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


def _assert_trees_close(a, b, rtol=1e-5):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(y))) + 1e-8)


def test_published_nfnets_stack_their_long_runs():
  f7 = models.stacked_layout("nfnet:F7")
  assert [len(run) for run in f7.runs] == [7, 15, 47, 23]
  assert f7.runs[0][:2] == ("NFNet/~/nf_block_1", "NFNet/~/nf_block_2")
  shapes = models.param_shapes("nfnet:F7")
  stacked = jax.eval_shape(f7.stack, shapes)
  assert len(jax.tree_util.tree_leaves(shapes)) == 1661
  assert len(jax.tree_util.tree_leaves(stacked)) == 165
  conv = stacked["NFNet/~/nf_block_1__x7/~/conv1"]["w"]
  assert conv.shape == (7, *shapes["NFNet/~/nf_block_1/~/conv1"]["w"].shape)
  assert "NFNet/~/nf_block_1" not in stacked and "NFNet/~/nf_block_8" in stacked
  # AGC's default finds the block axis by the stacked module's name.
  assert optim.stacked_layers("NFNet/~/nf_block_1__x7/~/conv1", "w") == 1
  assert optim.stacked_layers("NFNet/~/nf_block_1__x7", "skip_gain") == 1
  assert optim.stacked_layers("NFNet/~/nf_block_8/~/conv1", "w") == 0
  # F0's runs (5 and 2 blocks) are not scanned by default, so nothing is stacked;
  # neither is the batch-normalised baseline, which has no scanned runs.
  assert models.stacked_layout("nfnet:F0").is_identity
  assert models.stacked_layout("bn_resnet:ResNet50").is_identity
  assert models.stacked_layout("nfnet:F7", block_loop="unroll").is_identity


@pytest.mark.slow
def test_the_model_gives_and_takes_its_own_layout(scanned):
  model, layout, params = scanned
  init = jax.eval_shape(lambda r: model.init(r, IMAGES), jax.random.key(0))
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(layout.stack(params))
  stacked_logits = model.apply(layout.stack(params), None, IMAGES, is_training=False)["logits"]
  published_logits = model.apply(params, None, IMAGES, is_training=False)["logits"]
  np.testing.assert_array_equal(stacked_logits, published_logits)
  _assert_trees_equal(layout.to_published(layout.stack(params)), params)
  _assert_trees_equal(layout.to_published(params), params)


def test_stack_then_unstack_is_lossless(scanned):
  _, layout, params = scanned
  assert [len(run) for run in layout.runs] == [2, 3, 5, 2]
  stacked = layout.stack(params)
  assert len(jax.tree_util.tree_leaves(stacked)) < len(jax.tree_util.tree_leaves(params))
  _assert_trees_equal(layout.unstack(stacked), params)
  _assert_trees_equal(jax.jit(layout.unstack_all)(stacked), params)


def test_stacking_a_tree_without_a_block_names_it(scanned):
  _, layout, params = scanned
  block = layout.runs[1][2]
  broken = {k: v for k, v in params.items() if not k.startswith(block + "/")}
  with pytest.raises(ValueError, match=f"no {block}/~/conv0"):
    layout.stack(broken)


def test_agc_with_stacked_axes_clips_each_block_as_published():
  # Three blocks (a kernel, its gain, a skip gain each) and a classifier.
  blocks = [f"net/~/block_{i}" for i in range(3)]
  layout = models.StackedLayout([blocks])
  rng = np.random.default_rng(0)
  params = {"net/~/linear": {"w": rng.standard_normal((8, 5)), "b": np.zeros(5)}}
  for block in blocks:
    params[f"{block}/~/conv"] = {"w": rng.standard_normal((3, 3, 4, 8)),
                                 "gain": rng.standard_normal(8)}
    params[block] = {"skip_gain": rng.standard_normal(())}
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  # Each output unit's gradient is its parameters times a ratio from 0.001 to
  # 0.2 (times 0.5, 1 or 1.5 by block, 3 leaves each, so the blocks differ): many units,
  # but not all, are over the 0.05 clipping.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  grads = jax.tree_util.tree_unflatten(treedef, [
      p * (jnp.linspace(0.001, 0.2, p.shape[-1]) if p.ndim else 0.1) * (0.5 + 0.5 * (i // 3 % 3))
      for i, p in enumerate(leaves)])
  # The same optimizer for both trees: the default `stacked_axes` reads the names.
  opt = stacked_opt = optim.nfnet_optimizer(0.1, clipping=0.05, record_clip_fraction=True)
  updates, state = opt.update(grads, opt.init(params), params)
  s_params = layout.stack(params)
  assert s_params["net/~/block_0__x3/~/conv"]["w"].shape == (3, 3, 3, 4, 8)
  s_updates, s_state = stacked_opt.update(layout.stack(grads), stacked_opt.init(s_params),
                                          s_params)
  fraction = float(optim.agc_clip_fraction(state))
  assert 0.05 < fraction < 0.95
  assert float(optim.agc_clip_fraction(s_state)) == pytest.approx(fraction, rel=1e-6)
  _assert_trees_close(layout.unstack(s_updates), updates)
  # Told that nothing is stacked, AGC would pool the blocks' units: a different update.
  pooled = optim.nfnet_optimizer(0.1, clipping=0.05, stacked_axes=lambda module, name: 0)
  wrong, _ = pooled.update(layout.stack(grads), pooled.init(s_params), s_params)
  for name in ("net/~/block_1/~/conv", "net/~/block_1"):
    for leaf in updates[name]:
      assert not np.allclose(layout.unstack(wrong)[name][leaf], updates[name][leaf]), (name, leaf)


def test_agc_rejects_a_bad_stacked_axes_answer():
  clip = optim.adaptive_grad_clip(0.01, stacked_axes=lambda module, name: 3)
  params = {"m": {"w": jnp.ones((2, 4))}}
  with pytest.raises(ValueError, match=r"stacked_axes gave 3 for 'm/w' of shape \(2, 4\)"):
    clip.update(params, clip.init(params), params)


def test_optimizer_state_converts_between_layouts(scanned):
  _, layout, params = scanned
  opt = optim.nfnet_optimizer(0.1, record_clip_fraction=True)
  state = opt.init(params)
  stacked = layout.stack_all(state)
  assert (jax.tree_util.tree_structure(stacked)
          == jax.tree_util.tree_structure(opt.init(layout.stack(params))))
  _assert_trees_equal(layout.unstack_all(stacked), state)


SCHEDULE = optim.nfnet_lr_schedule(0.4, batch_size=4, total_steps=10, warmup_steps=2)


def _optimizer():
  return optim.nfnet_optimizer(SCHEDULE, record_clip_fraction=True)


def _train(model, mesh, state, steps_to_run=2):
  opt, ema, schedule = _optimizer(), optim.params_ema(0.9), SCHEDULE
  config = steps.StepConfig(num_classes=NUM_CLASSES)
  step = steps.make_train_step(model, opt, ema, schedule, config, mesh, jax.random.key(1))
  batch = steps.global_batch(mesh, {"images": np.asarray(IMAGES), "labels": np.asarray(LABELS)})
  for _ in range(steps_to_run):
    state, metrics = step(state, batch)
  return state, jax.device_get(metrics), opt, ema


@pytest.mark.slow
def test_train_step_in_the_stacked_layout_matches_the_published(scanned, tmp_path):
  model, layout, _ = scanned
  mesh = steps.make_mesh(jax.devices()[:1])
  stacked_state = steps.init_state(model, _optimizer(), optim.params_ema(0.9),
                                   jax.random.key(0), (16, 16), mesh)
  # The same model trained from the published tree (a copy: a step donates its state).
  state = jax.jit(layout.unstack_all)(stacked_state)
  published, metrics, _, _ = _train(model, mesh, state)
  stacked, s_metrics, s_opt, ema = _train(model, mesh, stacked_state)
  target = steps.abstract_state(model, s_opt, ema, (16, 16), mesh)
  assert jax.tree_util.tree_structure(target) == jax.tree_util.tree_structure(stacked_state)
  assert s_metrics.keys() == metrics.keys()
  for key in metrics:
    np.testing.assert_allclose(s_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
  _assert_trees_close(layout.unstack_all(stacked), published)

  # Checkpoints hold the published tree: a stacked state saved, read back
  # published by the export tools, and restored stacked.
  checkpointer = Checkpointer(str(tmp_path), async_save=False, layout=layout)
  checkpointer.save(stacked, {"model": NAME})
  on_disk = weights.load_params(tmp_path)
  _assert_trees_equal(on_disk, layout.unstack(jax.device_get(stacked.params)))
  restored, meta = checkpointer.restore(target)
  checkpointer.close()
  assert meta["step"] == 2
  _assert_trees_equal(restored, stacked)


@pytest.mark.parametrize("block_loop", ["scan", "auto"])
def test_published_tree_unstacks_whichever_loop_stacked_the_runs(block_loop):
  """A scan-stacked F1 tree also holds every module the 'auto' layout stacks; reading it as
  'auto' left its other runs stacked (folding then refused the tree). Abstract shapes only."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  model = models.transform("nfnet:F1", 10, block_loop=block_loop)
  stacked = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  assert any("__x" in module for module in stacked)
  published = jax.eval_shape(lambda p: models.published_tree("nfnet:F1", p, 10), stacked)
  want = models.param_shapes("nfnet:F1", 10)
  assert models.tree.leaf_shapes(published) == models.tree.leaf_shapes(want)
