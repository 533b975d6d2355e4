"""Parsing of the published augmentation names, e.g. 'cutmix_mixup_randaugment_405'.

Experiment configs name their augmentation with one string, so the string is the
contract: this module turns it into an `AugmentSpec` (and nothing else), without
TensorFlow, so configs can be validated before any data is touched.

Grammar: '_'-separated tokens, in any order, each at most once:
  * 'mixup', optionally followed by its Beta(alpha, alpha) parameter, e.g.
    'mixup_0.4' (the published default alpha is 0.2);
  * 'cutmix' (box area uniform in [0, 1], i.e. Beta(1, 1) as published);
  * 'randaugment_<level>': '<level>' = 'M' means 2 layers of magnitude M, and a
    level above 100 means N layers of magnitude MM, 'NMM' (so '405' = 4 layers
    at magnitude 5, '415' = 4 at 15), exactly as the published configs read.
"""

import dataclasses
import re
from typing import Optional

DEFAULT_MIXUP_ALPHA = 0.2
DEFAULT_RANDAUGMENT_LAYERS = 2
MAX_RANDAUGMENT_MAGNITUDE = 30

VALID_FORMS = (
    "augment_name must be None or '_'-joined tokens, each at most once: 'mixup' "
    "(optionally followed by its alpha, e.g. 'mixup_0.4'; default 0.2), 'cutmix', and "
    "'randaugment_<level>' where <level> 'M' means 2 layers of magnitude M and 'NMM' means N "
    f"layers of magnitude MM (magnitude 0..{MAX_RANDAUGMENT_MAGNITUDE}); for example "
    "'cutmix_mixup_randaugment_405', 'mixup_cutmix', 'randaugment_410', 'cutmix', 'mixup', "
    "'mixup_0.4_randaugment_15'."
)

#: Where a mixed image's partner comes from (see `mixing.py`): 'stream', the next
#: example read (published: two decoded images per output), or 'batch', another
#: image of the same output batch (one decoded image per output, as timm mixes).
MIX_SOURCES = ("stream", "batch")

_FLOAT = re.compile(r"^\d+(\.\d*)?$|^\.\d+$")
_INT = re.compile(r"^\d+$")


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """What an augmentation name asks for.

  Attributes:
    mixup: Blend pairs of images with a Beta(alpha, alpha) ratio.
    mixup_alpha: The Beta parameter for mixup.
    cutmix: Paste a box of one image into another.
    randaugment_layers: RandAugment's N (ops per image), or None for no RandAugment.
    randaugment_magnitude: RandAugment's M, on the published 0..10(+) scale.
  """
  mixup: bool = False
  mixup_alpha: float = DEFAULT_MIXUP_ALPHA
  cutmix: bool = False
  randaugment_layers: Optional[int] = None
  randaugment_magnitude: int = 0

  @property
  def mixes(self) -> bool:
    """Whether batches pair up examples (and so carry `mix_labels` and `ratio`)."""
    return self.mixup or self.cutmix

  @property
  def randaugment(self) -> bool:
    return self.randaugment_layers is not None


def _bad(name: object, why: str) -> ValueError:
  return ValueError(f"Unknown augmentation {name!r}: {why}. {VALID_FORMS}")


def parse_augment_name(name: Optional[str]) -> AugmentSpec:
  """Parses a published-style augmentation name; None or '' means no augmentation.

  Raises:
    ValueError: naming the offending token and listing the valid forms.
  """
  if name is None or name == "":
    return AugmentSpec()
  if not isinstance(name, str):
    raise _bad(name, f"expected a string, got {type(name).__name__}")
  tokens = name.lower().split("_")
  seen: set[str] = set()
  fields: dict = {}
  i = 0
  while i < len(tokens):
    token = tokens[i]
    if token in seen:
      raise _bad(name, f"{token!r} appears twice")
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if token == "mixup":
      fields["mixup"] = True
      if nxt is not None and _FLOAT.match(nxt):
        alpha = float(nxt)
        if alpha <= 0:
          raise _bad(name, f"mixup alpha must be > 0, got {nxt!r}")
        fields["mixup_alpha"] = alpha
        i += 1
    elif token == "cutmix":
      fields["cutmix"] = True
    elif token == "randaugment":
      if nxt is None or not _INT.match(nxt):
        raise _bad(name, "'randaugment' must be followed by an integer level such as '405' or '10'")
      level = int(nxt)
      layers, magnitude = (level // 100, level % 100) if level > 100 else (
          DEFAULT_RANDAUGMENT_LAYERS, level)
      if magnitude > MAX_RANDAUGMENT_MAGNITUDE:
        raise _bad(name, f"RandAugment magnitude {magnitude} (from level {nxt!r}) is above "
                   f"{MAX_RANDAUGMENT_MAGNITUDE}")
      fields["randaugment_layers"] = layers
      fields["randaugment_magnitude"] = magnitude
      i += 1
    else:
      raise _bad(name, f"unexpected token {token!r}")
    seen.add(token)
    i += 1
  return AugmentSpec(**fields)


def check_mix_source(mix_source: str) -> str:
  """Returns `mix_source` if it is one of `MIX_SOURCES`; else a ValueError naming it."""
  if not isinstance(mix_source, str) or mix_source not in MIX_SOURCES:
    raise ValueError(f"Unknown mix_source {mix_source!r}; valid: {', '.join(map(repr, MIX_SOURCES))} "
                     "('stream': each output mixes two images read for it, as published; "
                     "'batch': each image is mixed with another of its batch).")
  return mix_source
