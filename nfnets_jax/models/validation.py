"""Argument checks shared by the model families: fail early, name the bad value."""

from typing import Any, Mapping

from nfnets_jax.models import activations


def check_variant(family: str, variant: Any, table: Mapping[str, Any]) -> Mapping[str, Any]:
  """Returns the variant's row, or raises listing every valid variant."""
  if not isinstance(variant, str) or variant not in table:
    raise ValueError(
        f"Unknown {family} variant {variant!r}; valid variants: {', '.join(table)}.")
  return table[variant]


def check_num_classes(num_classes: Any) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  return num_classes


def check_rate(name: str, value: Any) -> float:
  """A drop probability: a number in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
  return float(value)


def check_positive(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}.")
  return value


def check_nf_network(family: str, variant: Any, table: Mapping[str, Any], num_classes: Any,
                     width: Any, stochdepth_rate: Any, drop_rate: Any,
                     activation: Any) -> tuple[Mapping[str, Any], float, str]:
  """The checks every normalizer-free family shares.

  Returns the variant's row, the drop rate (the row's when `drop_rate` is
  None) and the activation's canonical name.
  """
  row = check_variant(family, variant, table)
  check_num_classes(num_classes)
  check_positive("width", width)
  check_rate("stochdepth_rate", stochdepth_rate)
  drop_rate = check_rate("drop_rate", row["drop_rate"] if drop_rate is None else drop_rate)
  activation = activations.canonical_name(activation)
  activations.get_activation(activation, elementwise_only=True)
  return row, drop_rate, activation
