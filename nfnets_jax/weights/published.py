"""The published ImageNet NFNets by name: `published:F0` .. `published:F6`.

`load("F0")` gives the parameters of the published `F0_haiku.npz`
(downloaded once and verified against its pinned MD5 by `download.fetch`). The
first load reads the pickle with the restricted unpickler and writes this
project's safe `.npz` next to it, so later loads never unpickle. Checking the
tree against its network is the loader's job (`loading.load_model`), done once
where the weights enter; `--checkpoint=published:F0` and
`weights.pretrained('nfnet:F0')` both come here.
"""

import pathlib
from typing import Any, Optional

from nfnets_jax.weights import download, formats

PREFIX = "published:"


def is_published_name(path: Any) -> bool:
  """Whether `path` names published weights (`'published:F0'`), not a file."""
  return isinstance(path, str) and path.startswith(PREFIX)


def variant_of(name: str) -> str:
  """'published:F0' or 'nfnet:F0' -> 'F0', with an error listing the published variants."""
  for prefix in (PREFIX, "nfnet:"):
    if name.startswith(prefix):
      variant = name[len(prefix):]
      if variant in download.PUBLISHED:
        return variant
  valid = ", ".join(f"{PREFIX}{v} (nfnet:{v})" for v in download.PUBLISHED)
  raise ValueError(f"No published weights for {name!r}; published: {valid}.")


def model_name(variant: str) -> str:
  """The registry name of a published variant's network: 'F0' -> 'nfnet:F0'."""
  return f"nfnet:{variant}"


def meta(variant: str) -> dict[str, Any]:
  """What a training checkpoint's `meta` records, for the published weights."""
  return {"model": model_name(variant), "num_classes": 1000, "model_kwargs": {}}


def resolve(path: Any) -> Optional[tuple[str, dict[str, Any]]]:
  """`(variant, meta)` when `path` names published weights (`'published:F0'`), else None."""
  if not is_published_name(path):
    return None
  variant = variant_of(path)
  return variant, meta(variant)


def converted_path(variant: str, **fetch_kwargs: Any) -> pathlib.Path:
  """Where the safe `.npz` converted from `variant`'s download is kept: beside the
  download, in the same cache (`fetch_kwargs` as for `download.fetch`)."""
  location = {key: fetch_kwargs[key] for key in ("table", "cache_dir") if key in fetch_kwargs}
  return download.cache_path(variant, **location).with_name(f"{variant}_safe.npz")


def load(variant: str, **fetch_kwargs: Any) -> formats.Params:
  """The published parameters of NFNet-`variant` (`download.fetch` keywords pass through).

  The converted `.npz` is read when it is there (it is only ever written from
  a verified download, and it holds no code); otherwise the pickle is fetched,
  read with the restricted unpickler and converted.

  Raises whatever `download.fetch` raises (offline, checksum mismatch, ...).
  """
  converted = converted_path(variant, **fetch_kwargs)
  if converted.exists():
    return formats.load_file(converted, trust_pickle=False)
  params = formats.load_file(pathlib.Path(download.fetch(variant, **fetch_kwargs)),
                             trust_pickle=False)
  formats.save_params_npz(params, converted)  # written beside, renamed into place
  return params
