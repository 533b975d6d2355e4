"""`python -m nfnets_jax.export`: see `command.py`."""

from nfnets_jax import cli
from nfnets_jax.export import command

if __name__ == "__main__":
  cli.run(command.main)
