"""The published ImageNet NFNets by name: `published:F0` .. `published:F6`.

`load("F0")` gives the parameters of the published `F0_haiku.npz`
(downloaded once and verified by `weights.fetch`). The first load reads the
pickle with the restricted unpickler, checks every name and shape against
the model's own tree, and writes this project's safe `.npz` next to it, so
later loads never unpickle (nor need the pickle or the network). `checkpoint.load_params("published:F0")`, the
tools' `--checkpoint=published:F0` and `models.pretrained("nfnet:F0")` all
come here.
"""

import pathlib
from typing import Any

PREFIX = "published:"


def is_published_name(path: Any) -> bool:
  """Whether `path` names published weights (`'published:F0'`), not a file."""
  return isinstance(path, str) and path.startswith(PREFIX)


def variant_of(name: str) -> str:
  """'published:F0' or 'nfnet:F0' -> 'F0', with an error listing the published variants."""
  from nfnets_jax import weights  # pylint: disable=import-outside-toplevel

  for prefix in (PREFIX, "nfnet:"):
    if name.startswith(prefix):
      variant = name[len(prefix):]
      if variant in weights.PUBLISHED:
        return variant
  valid = ", ".join(f"{PREFIX}{v} (nfnet:{v})" for v in weights.PUBLISHED)
  raise ValueError(f"No published weights for {name!r}; published: {valid}.")


def model_name(variant: str) -> str:
  """The registry name of a published variant's network: 'F0' -> 'nfnet:F0'."""
  return f"nfnet:{variant}"


def meta(variant: str) -> dict[str, Any]:
  """What a training checkpoint's `meta` records, for the published weights."""
  return {"model": model_name(variant), "num_classes": 1000, "model_kwargs": {}}


def converted_path(variant: str, **fetch_kwargs: Any) -> pathlib.Path:
  """Where the safe `.npz` converted from `variant`'s download is kept: beside the
  download, in the same cache (`fetch_kwargs` as for `weights.fetch`)."""
  from nfnets_jax import weights  # pylint: disable=import-outside-toplevel

  location = {key: fetch_kwargs[key] for key in ("table", "cache_dir") if key in fetch_kwargs}
  return weights.cache_path(variant, **location).with_name(f"{variant}_safe.npz")


def load(variant: str, **fetch_kwargs: Any) -> dict[str, dict[str, Any]]:
  """The published parameters of NFNet-`variant` (`weights.fetch` keywords pass through).

  The converted `.npz` is read when it is there (it is only ever written from
  a verified download, and it holds no code); otherwise the pickle is fetched,
  read with the restricted unpickler and converted.

  Raises whatever `weights.fetch` raises (offline, checksum mismatch, ...)
  and `checkpoint.ParameterMismatchError` if the file does not fit the model.
  """
  from nfnets_jax import checkpoint, weights  # pylint: disable=import-outside-toplevel

  converted = converted_path(variant, **fetch_kwargs)
  if converted.exists():
    return checkpoint.load_params(converted, model=model_name(variant))
  pickle_path = pathlib.Path(weights.fetch(variant, **fetch_kwargs))
  params = checkpoint.load_params(pickle_path, model=model_name(variant))
  checkpoint.save_params_npz(params, converted)  # written beside, renamed into place
  return params
