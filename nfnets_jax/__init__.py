"""nfnets-jax: Normalizer-Free Networks and Adaptive Gradient Clipping for JAX/Haiku.

Importing this package (or `nfnets_jax.models` / `nfnets_jax.optim`) never imports
TensorFlow: projects that only want AGC or the models must not pay for the input
pipelines.
"""

__version__ = "0.1.0"
