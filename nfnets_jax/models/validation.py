"""Argument checks shared by the model families: fail early, name the bad value."""

from typing import Any, Mapping


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
