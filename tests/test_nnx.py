"""`nfnets_jax.nnx`: the models as Flax NNX modules, against the Haiku models they wrap.

Skipped without Flax (the `flax` extra). Every comparison runs both sides jitted,
on the same parameters: logits within 1e-6 of the largest logit, training steps
within rtol 1e-5, round trips and frozen parameters exactly.
"""

import functools

import numpy as np
import pytest

pytest.importorskip("flax", reason="nfnets_jax.nnx needs the flax extra (pip install -e .[flax])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from nfnets_jax import models, optim, weights  # noqa: E402
from nfnets_jax import nnx as nf_nnx  # noqa: E402
from reference_data import param_trees, rebuild_params  # noqa: E402

NANO = "nfnet:nano"
# XLA's own convolutions: the wrapper, not the CPU lowering, is under test here (the
# lowerings give the same numbers, tests/test_conv.py), and they compile several times
# quicker on CPU, grouped ones (NF-RegNet-B0's) most of all.
XLA = {"conv_impl": "xla"}
# Stochastic depth and dropout off: training mode without random draws.
NO_RANDOMNESS = {"stochdepth_rate": 0.0, "drop_rate": 0.0, **XLA}


def _images(n=2, size=32, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


@functools.cache
def _nano_init():
  """Haiku's jitted init of nano (10 classes)."""
  return jax.jit(models.transform(NANO, 10, **XLA).init)


@functools.cache
def _nano_params():
  """Haiku's init of nano with live residual branches (its skip gains start at 0)."""
  params = _nano_init()(jax.random.key(0), _images(1))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, 0.7) if optim.split_path(path)[1] == "skip_gain" else x,
      params)


@functools.cache
def _haiku_forward(name, num_classes, is_training, return_metrics, kwargs):
  """Haiku's jitted forward pass, one per model and mode (shared by the tests)."""
  model = models.transform(name, num_classes, **dict(kwargs))
  return jax.jit(lambda p, k, x: model.apply(p, k, x, is_training, return_metrics))


def _haiku_outputs(name, params, images, is_training, rng=None, return_metrics=False,
                   **kwargs):
  num_classes = models.infer_num_classes(params)
  forward = _haiku_forward(name, num_classes, is_training, return_metrics,
                           tuple(sorted(kwargs.items())))
  return forward(params, rng, images)


def _haiku_logits(name, params, images, is_training, rng=None, **kwargs):
  return _haiku_outputs(name, params, images, is_training, rng, **kwargs)["logits"]


@nnx.jit(static_argnames=("is_training", "return_metrics"))
def _nnx_logits(module, images, is_training, return_metrics=False):
  return module(images, is_training=is_training, return_metrics=return_metrics)


def _assert_close_to_largest(got, want, tol=1e-6):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == np.float32 and got.shape == want.shape
  error = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert error <= tol, error


def _assert_trees_equal(a, b):
  assert sorted(a) == sorted(b)
  for module in a:
    assert sorted(a[module]) == sorted(b[module]), module
    for name in a[module]:
      x, y = np.asarray(a[module][name]), np.asarray(b[module][name])
      assert x.dtype == y.dtype and x.shape == y.shape, (module, name)
      np.testing.assert_array_equal(x, y, err_msg=f"{module}/{name}")


def _check_logits_match(name, params, images, return_metrics=False, modes=(False, True),
                        **kwargs):
  """from_haiku's logits (and with `return_metrics` the signal metrics) against
  Haiku's, in each mode of `modes` (is_training: inference, training)."""
  module = nf_nnx.from_haiku(name, params, **kwargs)
  for is_training in modes:
    got = _nnx_logits(module, images, is_training, return_metrics=return_metrics)
    want = _haiku_outputs(name, params, images, is_training, return_metrics=return_metrics,
                          **kwargs)
    if not return_metrics:
      _assert_close_to_largest(got, want["logits"])
      continue
    assert sorted(got) == sorted(want) and "res_avg_var_0" in got and "pool" in got
    _assert_close_to_largest(got["logits"], want["logits"])
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_nano_logits_match_haiku_in_inference_and_training():
  _check_logits_match(NANO, _nano_params(), _images(), return_metrics=True, **NO_RANDOMNESS)


# The larger models in inference mode only: the module hands `is_training` to the Haiku
# model whatever the network (nano checks both modes above), and each mode is a compile
# of the whole network on both sides.
@pytest.mark.slow
def test_f0_logits_match_haiku():
  params = rebuild_params(param_trees()["nfnet:F0"])
  _check_logits_match("nfnet:F0", params, _images(), modes=(False,), **NO_RANDOMNESS)


@pytest.mark.slow
def test_nf_regnet_logits_match_haiku_with_its_runs_stacked():
  """NF-RegNet-B0 with every run of blocks scanned: the module holds the stacked
  layout, takes the published tree and gives it back unchanged."""
  params = rebuild_params(param_trees()["nf_regnet:B0"])
  kwargs = {"block_loop": "scan", **NO_RANDOMNESS}
  module = nf_nnx.from_haiku("nf_regnet:B0", params, **kwargs)
  assert any("__x" in path for path in module.params), "no run was stacked"
  # AGC finds the block axis of the stacked runs from the NNX state's paths too.
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]:
    stacked = "__x" in optim.split_path(path)[0]
    assert optim.stacked_layers(*optim.split_path(path)) == int(stacked), path
  _check_logits_match("nf_regnet:B0", params, _images(), modes=(False,), **kwargs)
  _assert_trees_equal(nf_nnx.to_haiku(module), params)


def test_to_haiku_gives_back_exactly_the_tree_from_haiku_took():
  params = _nano_params()
  module = nf_nnx.from_haiku(NANO, params)
  back = nf_nnx.to_haiku(module)
  _assert_trees_equal(back, params)
  # The module wraps the caller's arrays: nothing is copied on the way in or out.
  assert back["NFNet/~/linear"]["w"] is params["NFNet/~/linear"]["w"]


@pytest.mark.slow
def test_create_initialises_as_haiku_does():
  module = nf_nnx.create(NANO, 10, rngs=nnx.Rngs(params=3))
  want = _nano_init()(nnx.Rngs(params=3).params(), _images(1))
  _assert_trees_equal(nf_nnx.to_haiku(module), want)


@pytest.mark.slow
def test_training_draws_from_the_modules_rngs():
  """Stochastic depth and dropout take their keys from the module's `dropout`
  stream: the same keys give Haiku's logits, and each call draws a new one."""
  params, images = _nano_params(), _images(8)
  module = nf_nnx.from_haiku(NANO, params, rngs=nnx.Rngs(dropout=5), **XLA)
  twin = nnx.Rngs(dropout=5)
  first = _nnx_logits(module, images, True)
  second = _nnx_logits(module, images, True)
  _assert_close_to_largest(first, _haiku_logits(NANO, params, images, True, twin.dropout(), **XLA))
  _assert_close_to_largest(second,
                           _haiku_logits(NANO, params, images, True, twin.dropout(), **XLA))
  assert not np.allclose(first, second)

  no_rngs = nf_nnx.from_haiku(NANO, params, **XLA)
  _nnx_logits(no_rngs, images, False)  # inference needs no key
  with pytest.raises(ValueError, match=r"nfnet:nano drops .* no rngs: .*nnx\.Rngs\(dropout"):
    no_rngs(images, is_training=True)


def test_mismatched_parameters_are_named():
  params = {module: dict(leaves) for module, leaves in _nano_params().items()}
  del params["NFNet/~/stem_conv0"]["gain"]
  with pytest.raises(models.ParameterMismatchError, match="NFNet/~/stem_conv0/gain"):
    nf_nnx.from_haiku(NANO, params)
  with pytest.raises(ValueError, match="Unknown model 'nfnet:F9'"):
    nf_nnx.from_haiku("nfnet:F9", _nano_params())
  with pytest.raises(ValueError, match="BatchNorm statistics"):
    nf_nnx.create("bn_resnet:ResNet50", 10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"no 'params' or 'default' stream \(streams: \['dropout'\]\)"):
    nf_nnx.create(NANO, 10, rngs=nnx.Rngs(dropout=0))
  for name in (NANO, "published:F7"):
    with pytest.raises(ValueError, match=rf"No published weights for '{name}'; .*published:F0"):
      nf_nnx.pretrained(name)
  with pytest.raises(weights.WeightsError, match=r"No trained timm weights for 'timm:nfnet_f7'"):
    nf_nnx.pretrained("timm:nfnet_f7")


def _labels_by_path(tree):
  labels = optim.param_labels(tree)
  return {optim.split_path(path): label
          for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}


def test_parameter_groups_hold_for_the_nnx_state():
  module = nf_nnx.from_haiku(NANO, _nano_params())
  state = nnx.state(module, nnx.Param)
  labels = _labels_by_path(state)
  haiku = {(f"params/{module_path}", name): label
           for (module_path, name), label in _labels_by_path(_nano_params()).items()}
  assert labels == haiku  # the Variable form groups as the plain-array form does
  assert _labels_by_path(nnx.as_pure(state)) == haiku
  assert labels[("params/NFNet/~/linear", "w")] == "classifier"
  assert labels[("params/NFNet/~/linear", "b")] == "gain_bias"
  assert labels[("params/NFNet/~/nf_block_2/~/conv1", "gain")] == "gain_bias"
  assert labels[("params/NFNet/~/nf_block_2", "skip_gain")] == "gain_bias"
  assert labels[("params/NFNet/~/nf_block_2/~/squeeze_excite/~/linear", "w")] == "weight"
  assert labels[("params/NFNet/~/stem_conv0", "w")] == "weight"


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optimizer():
  # A large weight decay and a tight AGC, so that wrong groups would show.
  return optim.nfnet_optimizer(0.5, weight_decay=0.05, clipping=0.01, record_clip_fraction=True)


@nnx.jit
def _nnx_step(module, optimizer, images, labels):
  loss_fn = lambda m: _cross_entropy(m(images, is_training=True), labels)  # noqa: E731
  loss, grads = nnx.value_and_grad(loss_fn)(module)
  optimizer.update(module, grads)
  return loss


@pytest.mark.slow
def test_three_nnx_optimizer_steps_equal_three_haiku_steps():
  """nnx.Optimizer with nfnet_optimizer (AGC on), stochastic depth and dropout on,
  the same keys on both sides: the same parameters after three steps."""
  params, images = _nano_params(), _images(8)
  labels = jnp.arange(8) % 10
  model, tx = models.transform(NANO, 10, **XLA), _optimizer()

  @jax.jit
  def haiku_step(params, opt_state, key):
    loss_fn = lambda p: _cross_entropy(model.apply(p, key, images)["logits"], labels)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, twin = tx.init(params), nnx.Rngs(dropout=2)
  haiku_params, haiku_losses = params, []
  for _ in range(3):
    haiku_params, opt_state, loss = haiku_step(haiku_params, opt_state, twin.dropout())
    haiku_losses.append(float(loss))

  module = nf_nnx.from_haiku(NANO, params, rngs=nnx.Rngs(dropout=2), **XLA)
  optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)
  losses = [float(_nnx_step(module, optimizer, images, labels)) for _ in range(3)]

  np.testing.assert_allclose(losses, haiku_losses, rtol=1e-5)
  got = nf_nnx.to_haiku(module)
  for module_path, leaves in haiku_params.items():
    for name, want in leaves.items():
      np.testing.assert_allclose(got[module_path][name], want, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{module_path}/{name}")
  fraction = float(optim.agc_clip_fraction(nnx.as_pure(optimizer.opt_state)))
  assert fraction > 0 and fraction == pytest.approx(float(optim.agc_clip_fraction(opt_state)))
  assert int(optimizer.step[...]) == 3


def test_frozen_backbone_fine_tune_trains_only_the_head():
  module = nf_nnx.from_haiku(NANO, _nano_params(), rngs=nnx.Rngs(dropout=0), **XLA)
  before = jax.tree.map(np.array, nf_nnx.to_haiku(module))
  optimizer = nnx.Optimizer(module, _optimizer(), wrt=nf_nnx.CLASSIFIER)

  @nnx.jit
  def step(module, optimizer, images, labels):
    loss_fn = lambda m: _cross_entropy(m(images, is_training=True), labels)  # noqa: E731
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nf_nnx.CLASSIFIER))(module)
    optimizer.update(module, grads)

  images, labels = _images(8), jnp.arange(8) % 10
  for _ in range(3):
    step(module, optimizer, images, labels)
  after = nf_nnx.to_haiku(module)
  head = "NFNet/~/linear"
  assert all(not np.array_equal(after[head][name], before[head][name]) for name in ("w", "b"))
  for module_path, leaves in before.items():
    if module_path != head:
      for name, value in leaves.items():
        np.testing.assert_array_equal(after[module_path][name], value,
                                      err_msg=f"{module_path}/{name}")
  # The two filters split the parameters: the head's w and b, and all the others.
  count = lambda f: len(jax.tree.leaves(nnx.state(module, f)))  # noqa: E731
  assert count(nf_nnx.CLASSIFIER) == 2
  assert count(nf_nnx.BACKBONE) == count(nnx.Param) - 2 > 0


@pytest.mark.slow
def test_sam_grad_takes_the_nnx_state():
  """`optim.sam_grad` on `nnx.state(module, nnx.Param)` gives what it gives on the Haiku tree."""
  params, images = _nano_params(), _images(8)
  labels = jnp.arange(8) % 10
  module = nf_nnx.from_haiku(NANO, params, **NO_RANDOMNESS)
  graphdef, state, rest = nnx.split(module, nnx.Param, ...)

  def nnx_loss(param_state, batch):
    logits = nnx.merge(graphdef, param_state, rest)(batch["images"], is_training=True)
    return _cross_entropy(logits, batch["labels"]), logits

  haiku_model = models.transform(NANO, 10, **NO_RANDOMNESS)

  def haiku_loss(p, batch):
    logits = haiku_model.apply(p, None, batch["images"])["logits"]
    return _cross_entropy(logits, batch["labels"]), logits

  batch = {"images": images, "labels": labels}
  grads, _ = jax.jit(optim.sam_grad(nnx_loss, rho=0.1))(state, batch)
  want, _ = jax.jit(optim.sam_grad(haiku_loss, rho=0.1))(params, batch)
  assert isinstance(grads, nnx.State)
  got = nnx.to_pure_dict(grads)["params"]
  for module_path, leaves in want.items():
    for name, value in leaves.items():
      np.testing.assert_allclose(got[module_path][name], value, rtol=1e-5, atol=1e-7)


def test_params_ema_takes_the_nnx_state():
  """`optim.params_ema` on `nnx.state(module, nnx.Param)`: the average of the state and
  a moved state is that of the Haiku trees, and stays an `nnx.State`."""
  params = _nano_params()
  state = nnx.state(nf_nnx.from_haiku(NANO, params), nnx.Param)
  ema = optim.params_ema(0.9)
  got = ema.update(jax.tree.map(lambda x: 2.0 * x + 1.0, state), ema.init(state))
  want = ema.update(jax.tree.map(lambda x: 2.0 * x + 1.0, params), ema.init(params))
  assert int(got.count) == int(want.count) == 1
  assert isinstance(got.ema, nnx.State)
  _assert_trees_equal(nnx.to_pure_dict(got.ema)["params"], want.ema)


@pytest.mark.slow
def test_nnx_state_saves_and_restores_with_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="the orbax test needs orbax-checkpoint")
  module = nf_nnx.from_haiku(NANO, _nano_params(), rngs=nnx.Rngs(dropout=4), **XLA)
  images = _images(8)
  _nnx_logits(module, images, True)  # moves the rng stream on
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", nnx.state(module))
  checkpointer.wait_until_finished()

  abstract = nnx.eval_shape(
      lambda: nf_nnx.from_haiku(NANO, _nano_params(), rngs=nnx.Rngs(dropout=0), **XLA))
  graphdef, abstract_state = nnx.split(abstract)
  restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract_state))
  _assert_trees_equal(nf_nnx.to_haiku(restored), nf_nnx.to_haiku(module))
  # The rng stream resumes where it was: the next training call drops the same branches.
  np.testing.assert_array_equal(_nnx_logits(restored, images, True),
                                _nnx_logits(module, images, True))


def test_to_haiku_writes_a_checkpoint_the_tools_load(tmp_path):
  module = nf_nnx.from_haiku(NANO, _nano_params())
  path = tmp_path / "nano.npz"
  weights.save_params_npz(nf_nnx.to_haiku(module), path)
  loaded = weights.load_params(path, model=NANO)  # checks every name and shape
  _assert_trees_equal(loaded, jax.tree.map(np.asarray, nf_nnx.to_haiku(module)))
