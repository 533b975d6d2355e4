"""`fast_init.transform` gives exactly what plain `hk.transform` gives.

Parameters for a seed (jitted and eager), training-mode outputs (stochastic
depth and dropout keys) and the parameter tree are compared bit for bit with
`hk.transform` of the same network; so are the cases it
does not batch (other initialisers, a changed `rng_reserve_size`, more draws
than precomputed keys). The compiled init's structure is checked too: its
random draws are a handful of batched loops, not one per parameter.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import fast_init, registry

from jaxpr_helpers import primitive_counts

IMAGES = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
KEY = jax.random.key(7)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for path, x, y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(a),
                        jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path[0]))


def _pair(name, **kwargs):
  """The same network under plain `hk.transform` and under `fast_init.transform`."""
  forward = registry._forward(name, 10, kwargs)
  return hk.transform(forward), fast_init.transform(forward)


def _jit_init(model, images=IMAGES, key=KEY):
  return jax.jit(lambda r: model.init(r, images))(key)


# Small members of two families (NF-RegNet's layers are the same kinds);
# nano with every run scanned covers the parameters a scanned run creates
# block by block.
@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,loop", [
    ("nfnet:nano", {}, "scan"),
    ("nf_resnet:ResNet50", {"width": 1}, "auto"),
])
def test_same_parameters_as_haiku(name, kwargs, loop):
  plain, fast = _pair(name, block_loop=loop, **kwargs)
  reference, params = _jit_init(plain), _jit_init(fast)
  _assert_same(reference, params)
  # The placeholders were all replaced (only a zero-initialised classifier,
  # as NF-RegNet's, may be constant).
  weights = [leaf for leaf in jax.tree_util.tree_leaves(params) if leaf.size > 1]
  constant = [w.shape for w in weights if w.ndim >= 2 and np.asarray(w).std() == 0]
  assert len(constant) <= 1, constant


@pytest.mark.slow
def test_apply_is_haikus():
  """Training-mode outputs (stochastic depth, dropout) from the same parameters."""
  plain, fast = _pair("nfnet:nano", drop_rate=0.5, stochdepth_rate=0.5)
  params = _jit_init(fast)

  def train(model):
    return jax.jit(lambda p, r: model.apply(p, r, IMAGES, is_training=True))(params, KEY)
  _assert_same(train(plain), train(fast))


@pytest.mark.slow
def test_too_few_precomputed_keys_are_traced_again():
  # 3 precomputed keys run out (the forward draws 9): init is traced again
  # with more, to the same values.
  x, calls = jnp.ones((3,)), []

  def counted(x):
    calls.append(1)
    return _mixed_forward(x)
  _assert_same(_jit_init(hk.transform(_mixed_forward), x),
               _jit_init(fast_init.transform(counted, init_keys=3), x))
  assert len(calls) == 2
  _jit_init(fast_init.transform(counted), x)
  assert len(calls) == 3  # enough keys: traced once


def test_ws_conv_init_is_the_published_variance_scaling():
  """WSConv2D spells the published VarianceScaling(1, fan_in, normal) as a
  RandomNormal (which fast_init batches); the draws must be the same."""
  for shape in [(3, 3, 3, 16), (1, 1, 1536, 768), (3, 3, 128, 768)]:
    def draw(init, shape=shape):
      return hk.transform(lambda: init(shape, jnp.float32)).apply({}, KEY)
    fan_in = np.prod(shape[:-1])
    np.testing.assert_array_equal(
        draw(hk.initializers.VarianceScaling(1.0, "fan_in", "normal")),
        draw(hk.initializers.RandomNormal(stddev=np.sqrt(1.0 / fan_in))))


def _mixed_forward(x):
  """Initialisers fast_init batches, interleaved with ones it must leave alone."""
  a = hk.get_parameter("a", (3, 5), jnp.float32, init=hk.initializers.RandomNormal(0.5, 1.0))
  b = hk.get_parameter("b", (7,), jnp.float32,
                       init=hk.initializers.VarianceScaling(2.0, "fan_avg", "uniform"))
  c = hk.get_parameter("c", (15,), jnp.float32, init=hk.initializers.TruncatedNormal(2.0))
  d = hk.get_parameter("d", (4,), jnp.float32,
                       init=hk.initializers.TruncatedNormal(jnp.arange(4.0) + 1))
  e = hk.get_parameter("e", (2, 3), jnp.complex64, init=hk.initializers.TruncatedNormal())
  f = hk.get_parameter("f", (5, 3), jnp.float32,
                       init=hk.initializers.TruncatedNormal(1.0, lower=-1.0, upper=3.0))
  g = hk.get_parameter("g", (3,), jnp.bfloat16, init=hk.initializers.RandomNormal())
  h = hk.get_parameter("h", (15,), jnp.float32, init=hk.initializers.TruncatedNormal(0.1))
  noise = jax.random.normal(hk.next_rng_key(), x.shape)
  return (x + noise).sum() + a.sum() + b.sum() + c.sum() + d.sum() + jnp.abs(e).sum() \
      + f.sum() + g.astype(jnp.float32).sum() + h.sum()


@pytest.mark.slow
def test_initialisers_it_does_not_batch_are_created_as_usual():
  x = jnp.ones((3,))
  plain, fast = hk.transform(_mixed_forward), fast_init.transform(_mixed_forward)
  _assert_same(_jit_init(plain, x), _jit_init(fast, x))
  # Eager and jitted Haiku inits can differ in the last bit (under jit XLA
  # fuses the scaling into the draw), so eager is matched with eager.
  _assert_same(plain.init(KEY, x), fast.init(KEY, x))


def test_a_changed_rng_reserve_size_is_respected():
  x = jnp.ones((3,))
  previous = hk.experimental.rng_reserve_size(4)
  try:
    reference = hk.transform(_mixed_forward).init(KEY, x)
    params = fast_init.transform(_mixed_forward).init(KEY, x)
  finally:
    hk.experimental.rng_reserve_size(previous)
  _assert_same(reference, params)
  # ... and that setting changes Haiku's keys (else this test checks nothing).
  default = hk.transform(_mixed_forward).init(KEY, x)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(default),
                                                      jax.tree_util.tree_leaves(reference)))


def test_missing_rng_is_haikus_error():
  with pytest.raises(ValueError, match="non-None PRNGKey"):
    registry.transform("nfnet:nano", 10).init(None, IMAGES)


@pytest.mark.slow
def test_init_draws_in_a_few_batched_calls():
  """Plain Haiku draws (and splits a key for) each random parameter
  separately, one threefry kernel each under XLA; fast_init draws each group
  of equal-size arrays at once and splits all keys in one scan."""
  plain, fast = _pair("nfnet:F0")
  shapes = jax.tree_util.tree_leaves(registry.param_shapes("nfnet:F0", 10))
  weights = [leaf for leaf in shapes if len(leaf.shape) >= 2]
  # 4-D convolution kernels draw normals, 2-D squeeze-excite layers
  # truncated normals, and the classifier (2-D) a normal.
  groups = {(len(w.shape), int(np.prod(w.shape))) for w in weights} | {(0, 3072 * 10)}

  def counts(model):
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    init = lambda r, x: model.init(r, x, is_training=False)  # no draws in the forward
    return primitive_counts(jax.make_jaxpr(init)(KEY, images).jaxpr)
  plain_counts, fast_counts = counts(plain), counts(fast)
  # registry.transform(..., fast_init=False) is plain Haiku.
  assert counts(registry.transform("nfnet:F0", 10, fast_init=False)) == plain_counts
  assert plain_counts["random_bits"] == len(weights) == 82
  assert plain_counts["random_split"] >= len(weights)
  assert fast_counts["random_bits"] <= len(groups) < 25, (fast_counts["random_bits"], groups)
  assert fast_counts["random_split"] == 1  # inside the scan
  assert fast_counts["scan"] == 1
