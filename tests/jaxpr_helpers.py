"""Walking jaxprs in tests: what a traced function really computes."""

import collections


def all_eqns(jaxpr):
  """Every equation of a jaxpr, those nested in custom_vjp/scan/pjit bodies included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from all_eqns(inner)


def primitive_counts(jaxpr) -> collections.Counter:
  """How many call sites each primitive has in `jaxpr` and every jaxpr inside it."""
  return collections.Counter(eqn.primitive.name for eqn in all_eqns(jaxpr))
