"""Training: the experiment, data-parallel steps, checkpoints and reporting.

Run it with `python -m nfnets_jax.train --config=... --workdir=...`.
"""
