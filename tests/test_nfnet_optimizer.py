"""`nfnet_optimizer` against the published SGD-AGC rule, step for step
(independent NumPy oracle in tests/optim_reference.py)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import DictKey, GetAttrKey

import optim_reference as ref
from nfnets_jax.optim import (agc_clip_fraction, nfnet_lr_schedule, nfnet_optimizer,
                              param_labels, split_path)

OFFICIAL_TREES = pathlib.Path(__file__).parent / "data" / "official_param_trees.json"
STEPS = 3


def _run(opt, params, grads_seq):
  @jax.jit
  def step(grads, state, params):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  fractions = []
  for grads in grads_seq:
    params, state = step(grads, state, params)
    try:
      fractions.append(float(agc_clip_fraction(state)))
    except ValueError:
      fractions.append(None)
  return params, state, fractions


def _problem(seed):
  rng = np.random.default_rng(seed)
  params = ref.haiku_tree(rng)
  return params, [ref.random_grads(rng, params) for _ in range(STEPS)]


def _assert_trees_close(actual, expected, rtol=2e-5, atol=1e-7):
  jax.tree_util.tree_map_with_path(
      lambda path, a, e: np.testing.assert_allclose(
          np.asarray(a, np.float64), e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)),
      actual, expected)


@pytest.mark.parametrize("nesterov", [True, False])
def test_three_steps_with_schedule_match_published_rule(nesterov):
  params, grads_seq = _problem(0)
  # batch 512 -> peak 0.2; warm-up of 1 step so the three steps see 0, peak, decay.
  kw = dict(batch_size=512, total_steps=4, warmup_steps=1)
  schedule = nfnet_lr_schedule(0.1, **kw)
  opt = nfnet_optimizer(schedule, momentum=0.9, nesterov=nesterov, weight_decay=0.05,
                        clipping=0.02, record_clip_fraction=True)
  final, _, fractions = _run(opt, params, grads_seq)
  expected, expected_fractions = ref.nfnet_steps(
      params, grads_seq, lambda t: ref.warmup_cosine(t, 0.2, 1, 4), momentum=0.9,
      nesterov=nesterov, weight_decay=0.05, clipping=0.02, eps=1e-3)
  _assert_trees_close(final, expected)
  np.testing.assert_allclose(fractions, expected_fractions, rtol=1e-6)
  assert all(0 < f < 1 for f in expected_fractions)
  # The parameters moved (the warm-up's zero first step did not hide everything).
  assert not np.allclose(final[ref.CONV]["w"], params[ref.CONV]["w"])


def test_group_overrides_and_classifier_switch():
  params, grads_seq = _problem(1)
  # Regroup: only `gain`s skip weight decay (biases now decay), and the stem
  # conv plays the classifier; the switch also takes its gain/bias out of AGC.
  no_decay = lambda module, name: name == "gain"
  classifier = lambda module, name: module.endswith("stem_conv0")
  opt = nfnet_optimizer(0.3, momentum=0.5, weight_decay=0.1, clipping=0.01,
                        is_gain_or_bias=no_decay, is_classifier=classifier,
                        exclude_classifier_from_agc=True, record_clip_fraction=True)
  final, _, fractions = _run(opt, params, grads_seq)
  expected, expected_fractions = ref.nfnet_steps(
      params, grads_seq, lambda t: 0.3, momentum=0.5, nesterov=True, weight_decay=0.1,
      clipping=0.01, eps=1e-3, is_gain_or_bias=no_decay, is_classifier=classifier,
      exclude_classifier_from_agc=True)
  _assert_trees_close(final, expected)
  np.testing.assert_allclose(fractions, expected_fractions, rtol=1e-6)


def test_classifier_switch_with_published_groups():
  params, grads_seq = _problem(2)
  finals = []
  for exclude in (False, True):
    opt = nfnet_optimizer(0.1, exclude_classifier_from_agc=exclude, clipping=0.01)
    final, _, _ = _run(opt, params, grads_seq)
    expected, _ = ref.nfnet_steps(params, grads_seq, lambda t: 0.1, momentum=0.9, nesterov=True,
                                  weight_decay=2e-5, clipping=0.01, eps=1e-3,
                                  exclude_classifier_from_agc=exclude)
    _assert_trees_close(final, expected)
    finals.append(final["NFNet/~/linear"]["b"])
  # The classifier bias is zero-initialised, so AGC bounds its steps by
  # clipping * eps unless the switch is on: the two runs must differ there.
  assert np.linalg.norm(finals[0]) < np.linalg.norm(finals[1])


@pytest.mark.parametrize("kw", [dict(momentum=0.0, weight_decay=0.0),
                                dict(clipping=None),
                                dict(momentum=0.0, nesterov=False, clipping=0.5)])
def test_disabled_parts_still_follow_the_rule(kw):
  params, grads_seq = _problem(3)
  full = dict(momentum=0.9, nesterov=True, weight_decay=2e-5, clipping=0.01) | kw
  final, state, _ = _run(nfnet_optimizer(0.05, **full), params, grads_seq)
  expected, _ = ref.nfnet_steps(params, grads_seq, lambda t: 0.05, eps=1e-3, **full)
  _assert_trees_close(final, expected)
  if full["momentum"] == 0:
    # No momentum buffer is kept when there is no momentum.
    assert not optax.tree_utils.tree_get_all_with_path(state, "trace")


def test_official_f0_tree_groups():
  shapes = json.loads(OFFICIAL_TREES.read_text())["nfnet:F0"]
  params = {m: {n: np.zeros(0) for n in leaves} for m, leaves in shapes.items()}
  labels = param_labels(params)
  flat = {(m, n): label for m, leaves in labels.items() for n, label in leaves.items()}
  assert {k for k, v in flat.items() if v == "classifier"} == {("NFNet/~/linear", "w")}
  gains = {k for k, v in flat.items() if v == "gain_bias"}
  assert ("NFNet/~/linear", "b") in gains
  assert {n for _, n in gains} == {"b", "bias", "gain", "skip_gain"}
  weights = {k for k, v in flat.items() if v == "weight"}
  assert {n for _, n in weights} == {"w"}
  assert any("squeeze_excite/~/linear_1" in m for m, _ in weights)
  assert len(flat) == len(gains) + len(weights) + 1


def test_split_path_leaves_out_a_variables_value_step():
  """A Flax NNX `Variable` flattens to its `.value` attribute: that step is not the
  parameter's name, so an NNX state groups as its plain-array form (tests/test_nnx.py)."""
  path = (DictKey("params"), DictKey("NFNet/~/linear"), DictKey("w"))
  assert split_path(path + (GetAttrKey("value"),)) == split_path(path) == (
      "params/NFNet/~/linear", "w")
  assert split_path((DictKey("head"), GetAttrKey("kernel"))) == ("head", "kernel")
  assert split_path((GetAttrKey("value"),)) == ("", "value")


def test_composes_with_other_optax_transforms():
  params, grads_seq = _problem(4)
  opt = nfnet_optimizer(0.1, record_clip_fraction=True)
  published = dict(momentum=0.9, nesterov=True, weight_decay=2e-5, clipping=0.01, eps=1e-3)
  # A (non-binding) global-norm clip in front changes nothing.
  chained, _, fractions = _run(optax.chain(optax.clip_by_global_norm(1e6), opt), params,
                               grads_seq)
  expected, expected_fractions = ref.nfnet_steps(params, grads_seq, lambda t: 0.1, **published)
  _assert_trees_close(chained, expected)
  np.testing.assert_allclose(fractions, expected_fractions, rtol=1e-6)
  # Gradient accumulation: 2 micro-batches with the same gradient make one step.
  multi = optax.MultiSteps(opt, every_k_schedule=2)
  accumulated, _, _ = _run(multi, params, [grads_seq[0], grads_seq[0]])
  expected, _ = ref.nfnet_steps(params, grads_seq[:1], lambda t: 0.1, **published)
  _assert_trees_close(accumulated, expected)


def test_learning_rate_can_be_injected_and_logged():
  params, grads_seq = _problem(7)
  opt = optax.inject_hyperparams(nfnet_optimizer)(learning_rate=0.2, momentum=0.5)
  final, state, _ = _run(opt, params, grads_seq)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.2)
  expected, _ = ref.nfnet_steps(params, grads_seq, lambda t: 0.2, momentum=0.5, nesterov=True,
                                weight_decay=2e-5, clipping=0.01, eps=1e-3)
  _assert_trees_close(final, expected)


def test_bfloat16_gradients_keep_state_dtypes():
  params, grads_seq = _problem(5)
  opt = nfnet_optimizer(nfnet_lr_schedule(batch_size=256, total_steps=10, warmup_steps=0),
                        record_clip_fraction=True)
  bf16 = [jax.tree_util.tree_map(lambda g: jnp.asarray(g, jnp.bfloat16), g) for g in grads_seq]
  final, state, fractions = _run(opt, params, bf16)
  trace = optax.tree_utils.tree_get(state, "trace")
  assert {x.dtype for x in jax.tree_util.tree_leaves(trace)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(final)} == {jnp.dtype(jnp.float32)}
  as64 = [jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), g) for g in bf16]
  expected, _ = ref.nfnet_steps(params, as64, lambda t: ref.warmup_cosine(t, 0.1, 0, 10),
                                momentum=0.9, nesterov=True, weight_decay=2e-5, clipping=0.01,
                                eps=1e-3)
  _assert_trees_close(final, expected, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kw,message", [
    (dict(learning_rate=-0.1), r"learning_rate must be a number > 0 or an optax schedule.*-0.1"),
    (dict(learning_rate="fast"), r"learning_rate must be .*'fast'"),
    (dict(learning_rate=0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(learning_rate=0.1, weight_decay=-1e-5), r"weight_decay must be a number >= 0"),
    (dict(learning_rate=0.1, clipping=0.0), r"clipping must be a number > 0, or None"),
    (dict(learning_rate=0.1, eps=-1.0), r"eps must be a number > 0, got -1.0"),
    (dict(learning_rate=0.1, is_classifier="linear"), r"is_classifier must be a callable"),
    (dict(learning_rate=0.1, clipping=None, record_clip_fraction=True), r"clipping=None"),
])
def test_invalid_arguments(kw, message):
  with pytest.raises(ValueError, match=message):
    nfnet_optimizer(**kw)


def test_update_without_params_is_a_clear_error():
  params, grads_seq = _problem(6)
  opt = nfnet_optimizer(0.1)
  with pytest.raises(ValueError, match="needs the current parameters"):
    opt.update(grads_seq[0], opt.init(params))
