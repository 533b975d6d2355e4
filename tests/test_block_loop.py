"""Scanned and unrolled blocks are the same network.

A model built with `block_loop='scan'` runs each run of interchangeable
blocks as one `lax.scan` on stacked parameters; these tests check that
nothing observable changes: the published tree, the initial weights for a
seed, the stochastic-depth draws, the outputs and signal metrics, and the
gradients (to float32 rounding), and that the compiled program really holds
fewer blocks. The lowering is fixed when a model is built: two models built
with different choices keep them side by side in one process.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models
from nfnets_jax.models import network

# A small model whose stages hold several identical blocks (NF-RegNet's many
# 8-channel groups would take minutes to compile for the gradient here).
CASES = [
    ("nf_resnet:ResNet50", {"stochdepth_rate": 0.3, "drop_rate": 0.0}),
]


def _run(name, kwargs, mode, images):
  """Initial parameters, outputs, gradients (all in the published tree) and the jaxpr."""
  model = models.transform(name, 10, block_loop=mode, **kwargs)
  layout = models.stacked_layout(name, 10, block_loop=mode, **kwargs)
  params = jax.jit(model.init, static_argnames="is_training")(
      jax.random.key(0), images, is_training=True)
  # Skip gains start at zero, which would hide every residual branch.
  params = jax.tree_util.tree_map(lambda p: p + 0.5 if p.ndim <= 1 and p.size <= 8 else p,
                                  layout.to_published(params))
  params = layout.stack(params)

  def loss(params, key):
    outputs = model.apply(params, key, images, is_training=True, return_metrics=True)
    return jnp.sum(outputs["logits"] ** 2), outputs

  # Outputs and gradients from one program: one compilation per loop mode.
  grads, outputs = jax.jit(jax.grad(loss, has_aux=True))(params, jax.random.key(3))
  jaxpr = str(jax.make_jaxpr(loss)(params, jax.random.key(3)))
  return (layout.to_published(params), outputs, layout.to_published(grads), jaxpr)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", CASES)
def test_scan_and_unroll_agree(name, kwargs):
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  p_u, out_u, g_u, hlo_u = _run(name, kwargs, "unroll", images)
  p_s, out_s, g_s, hlo_s = _run(name, kwargs, "scan", images)

  assert jax.tree_util.tree_structure(p_s) == jax.tree_util.tree_structure(p_u)
  for a, b in zip(jax.tree_util.tree_leaves(p_s), jax.tree_util.tree_leaves(p_u)):
    np.testing.assert_array_equal(a, b)  # same initial weights for the seed
  assert sorted(out_s) == sorted(out_u)
  runs = [r for r in models.model_plan(name, 10, **kwargs).block_runs() if len(r) > 1]
  assert runs, "the case must contain a run of identical blocks"
  assert f"res_avg_var_{runs[0][-1]}" in out_s
  for key in out_u:  # same draws, same arithmetic: equal to rounding
    np.testing.assert_allclose(out_s[key], out_u[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree_util.tree_leaves(g_s), jax.tree_util.tree_leaves(g_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))) + 1e-7)

  assert " scan[" in hlo_s and " scan[" not in hlo_u
  # One copy of a scanned block's convolutions instead of one per block.
  assert hlo_s.count("conv_general_dilated[") < hlo_u.count("conv_general_dilated[")


@pytest.mark.slow
def test_squeeze_excite_blocks_and_their_draws_match():
  """NF-RegNet's blocks (squeeze-excite in the bottleneck), most branches dropped at
  random: both loops drop the same ones and compute the same logits."""
  name, kwargs = "nf_regnet:B0", {"stochdepth_rate": 0.9}
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  params = jax.jit(models.transform(name, 10, block_loop="unroll", **kwargs).init,
                   static_argnames="is_training")(jax.random.key(0), images, is_training=False)
  params = jax.tree_util.tree_map(lambda p: p + 0.5 if p.ndim == 0 else p, params)
  logits = {}
  for mode in ("unroll", "scan"):
    model = models.transform(name, 10, block_loop=mode, conv_impl="xla",  # quicker to compile
                             **kwargs)
    # The published tree (a loaded checkpoint) goes to either model as it is.
    logits[mode] = jax.jit(lambda p, k: model.apply(p, k, images, is_training=True)["logits"])(
        params, jax.random.key(11))
  np.testing.assert_allclose(logits["scan"], logits["unroll"], rtol=1e-5, atol=1e-6)


def test_block_runs_group_interchangeable_blocks():
  plan = models.model_plan("nfnet:F0")
  runs = plan.block_runs()
  assert [list(r) for r in runs] == [[0], [1], [2], [3], [4, 5, 6, 7, 8], [9], [10, 11]]
  assert sum(len(r) for r in runs) == len(plan.blocks)
  for run in runs:
    assert all(not plan.blocks[i].use_projection for i in run[1:])
  f7 = models.model_plan("nfnet:F7").block_runs()
  assert [len(r) for r in f7] == [1, 7, 1, 15, 1, 47, 1, 23]


def test_auto_scans_only_long_runs():
  plan = models.model_plan("nfnet:F3")
  long_runs = [r for r in plan.block_runs() if len(r) >= network.AUTO_SCAN_MIN_RUN]
  short_runs = [r for r in plan.block_runs() if 1 < len(r) < network.AUTO_SCAN_MIN_RUN]
  assert long_runs and short_runs
  assert all(network.scans_run("auto", r) for r in long_runs)
  assert not any(network.scans_run("auto", r) for r in short_runs)
  assert all(network.scans_run("scan", r) for r in short_runs)
  assert not any(network.scans_run("unroll", r) for r in long_runs)


def test_unknown_block_loop_is_an_error():
  with pytest.raises(ValueError, match=r"'fused'.*auto, scan, unroll"):
    models.transform("nfnet:nano", 10, block_loop="fused")


@pytest.mark.slow
def test_models_built_with_different_choices_lower_differently_in_one_process():
  """Each model keeps the lowering it was built with, whichever was jitted first."""
  name, kwargs = "nf_resnet:ResNet50", {"width": 1}  # runs of 2, 3, 5 and 2 blocks
  images = jnp.zeros((1, 16, 16, 3))
  choices = {"xla-unrolled": {"conv_impl": "xla", "block_loop": "unroll"},
             "decomposed-scanned": {"conv_impl": "decomposed", "block_loop": "scan"}}
  built = {key: models.transform(name, 10, **choice, **kwargs) for key, choice in choices.items()}
  params = jax.jit(built["xla-unrolled"].init)(jax.random.key(0), images)  # the published tree
  apply = {key: jax.jit(lambda p, x, model=model: model.apply(p, None, x, is_training=False))
           for key, model in built.items()}
  logits = {key: fn(params, images)["logits"] for key, fn in apply.items()}
  np.testing.assert_allclose(logits["decomposed-scanned"], logits["xla-unrolled"],
                             rtol=1e-5, atol=1e-6)
  text = {key: fn.lower(params, images).as_text() for key, fn in apply.items()}
  convs = {key: t.count("stablehlo.convolution") for key, t in text.items()}
  # ResNet50's 53 convolutions each lowered by XLA, against only the 3x3 and 7x7
  # ones (1x1 kernels become matrix products) of one copy of each scanned block.
  assert convs["xla-unrolled"] == 53, convs
  assert 0 < convs["decomposed-scanned"] < 20, convs
  assert "stablehlo.while" in text["decomposed-scanned"]
  assert "stablehlo.while" not in text["xla-unrolled"]


@pytest.mark.slow
def test_published_outputs_with_every_run_scanned():
  """The published NFNet-F0 (runs of 5 and 2 blocks, squeeze-excite at the output),
  with all of them scanned, still gives the published logits."""
  from reference_data import GOLDEN_SETTINGS, golden_outputs, param_trees, rebuild_params

  name = "nfnet:F0"
  golden = golden_outputs()
  model = models.transform(name, 1000, block_loop="scan", **GOLDEN_SETTINGS[name])
  params = rebuild_params(param_trees()[name])
  out = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False))(params, golden["input"])
  expected = golden[f"{name}:logits"]
  error = np.max(np.abs(np.asarray(out["logits"]) - expected)) / np.max(np.abs(expected))
  assert error <= 1e-4
