"""Gamma-scaled activations keep unit variance on N(0, 1) input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import activations

REQUIRED = ["identity", "celu", "elu", "gelu", "glu", "leaky_relu", "log_sigmoid",
            "log_softmax", "relu", "relu6", "selu", "sigmoid", "silu", "soft_sign",
            "softplus", "tanh"]


def test_every_published_activation_is_available():
  assert set(REQUIRED) <= set(activations.ACTIVATION_NAMES)


@pytest.mark.parametrize("name", REQUIRED)
def test_unit_variance_on_standard_normal(name):
  """Var(gamma * f(x)) = 1 for x ~ N(0, 1): what gamma is defined by.

  2M samples estimate a variance to about +-0.002 (one standard error is
  sqrt(2/N) relative for near-Gaussian output, more for skewed ones); the
  published constants were themselves sampled, so allow 0.5%. The second moment
  is printed by the failure message because it differs from 1 for every
  activation with a non-zero mean (relu: 1.47), by design.
  """
  x = jax.random.normal(jax.random.key(0), (2048, 1024), jnp.float32)
  y = activations.get_activation(name)(x)
  variance = float(jnp.var(y))
  assert abs(variance - 1.0) < 5e-3, (name, variance, float(jnp.mean(y ** 2)))


def test_gamma_matches_closed_form_for_relu():
  """relu's constant is 1/std(relu(x)) = 1/sqrt(1/2 - 1/(2 pi)) up to sampling error."""
  exact = 1.0 / np.sqrt(0.5 - 1.0 / (2 * np.pi))
  assert activations.GAMMAS["relu"] == pytest.approx(exact, rel=1e-3)


def test_activation_keeps_bfloat16():
  x = jnp.ones((4,), jnp.bfloat16)
  assert activations.get_activation("gelu")(x).dtype == jnp.bfloat16


def test_swish_is_an_alias_of_silu():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_array_equal(activations.get_activation("swish")(x),
                                activations.get_activation("silu")(x))


def test_unknown_activation_names_the_value_and_the_choices():
  with pytest.raises(ValueError, match=r"'relu7'.*gelu.*silu"):
    activations.get_activation("relu7")


@pytest.mark.parametrize("name", ["glu", "log_softmax"])
def test_channel_mixing_activations_are_refused_inside_networks(name):
  with pytest.raises(ValueError, match=name):
    activations.get_activation(name, elementwise_only=True)
