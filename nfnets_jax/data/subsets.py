"""A subset of a dataset's classes, relabelled 0..k-1, with at most N examples per class.

Transfer experiments train on some classes of a dataset (`classes='5-9'`)
and often on few labelled examples of each (`examples_per_class=10`).
`restrict(source, split, ...)` wraps a `sources.Source` so that reading,
counting and the number of classes all see only the subset:

* `classes`: class indices (`'5,6,7'`, `'5-9'`, or a sequence of ints) of the
  source; class `classes[i]` becomes label `i`.
* `examples_per_class`: keep the first N examples of each kept class in the
  split's stored order (TFDS's record order, an image folder's file order).
  The choice depends only on the split and N, never on the seed, the process
  count or the shuffle, so runs that differ in those train on the same images.

Counting and choosing need one pass over the split's labels and names
(images are read but not decoded), once per process and setting: cheap for
the small datasets transfer runs use, a full read for ImageNet.

`parse_classes` needs no TensorFlow, so configs are checked without it.
"""

import re
from typing import Any, Optional, Sequence, Union

Classes = Union[str, Sequence[int]]

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_INDEX = re.compile(r"^\s*(\d+)\s*$")


def parse_classes(classes: Optional[Classes]) -> Optional[tuple[int, ...]]:
  """`'5,6,7'`, `'5-9'`, `'0-2,7'` or `(5, 6)` -> a tuple of distinct class indices (None: None).

  Raises:
    ValueError: naming the part that is not an index or an ascending range,
      or a class given twice.
  """
  if classes is None:
    return None
  if isinstance(classes, str):
    out = []
    for part in classes.split(","):
      if match := _RANGE.match(part):
        first, last = int(match.group(1)), int(match.group(2))
        if last < first:
          raise ValueError(f"classes {classes!r}: range {part.strip()!r} runs backwards; "
                           "write it low-high, e.g. '5-9'.")
        out += range(first, last + 1)
      elif match := _INDEX.match(part):
        out.append(int(match.group(1)))
      else:
        raise ValueError(f"classes {classes!r}: {part.strip()!r} is not a class index or a "
                         "range; expected e.g. '5,6,7', '5-9' or '0-2,7'.")
  else:
    try:
      out = [int(c) for c in classes if not isinstance(c, bool) and int(c) == c and c >= 0]
      valid = len(out) == len(classes)
    except (TypeError, ValueError):
      valid = False
    if not valid:
      raise ValueError(f"classes must be a string like '5-9' or a sequence of class indices "
                       f"(ints >= 0), got {classes!r}.")
  if not out:
    raise ValueError(f"classes {classes!r} names no class.")
  repeated = sorted({c for c in out if out.count(c) > 1})
  if repeated:
    raise ValueError(f"classes {classes!r} names class(es) {repeated} more than once.")
  return tuple(out)


def check_examples_per_class(value: Optional[int]) -> None:
  """None (every example) or an int >= 1; else a ValueError naming the value."""
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"examples_per_class must be None (every example) or an int >= 1, "
                     f"got {value!r}.")


def restrict(source: Any, classes: Optional[Classes] = None,
             examples_per_class: Optional[int] = None) -> Any:
  """`source` seen through the subset (itself when both settings are None)."""
  wanted = parse_classes(classes)
  check_examples_per_class(examples_per_class)
  if wanted is None and examples_per_class is None:
    return source
  if wanted is None:
    wanted = tuple(range(source.num_classes))
  unknown = [c for c in wanted if not 0 <= c < source.num_classes]
  if unknown:
    raise ValueError(f"classes {list(unknown)} are not classes of dataset {source.name!r}, "
                     f"which has classes 0..{source.num_classes - 1}.")
  return SubsetSource(source, wanted, examples_per_class)


class SubsetSource:
  """A `sources.Source` restricted to `classes` (relabelled by position) and to
  the first `examples_per_class` examples of each; other attributes are the source's."""

  def __init__(self, source: Any, classes: tuple[int, ...], examples_per_class: Optional[int]):
    self._source = source
    self.classes = classes
    self.examples_per_class = examples_per_class

  def __getattr__(self, name: str) -> Any:
    return getattr(self._source, name)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def class_names(self) -> tuple[str, ...]:
    """The kept classes' names, in their new label order."""
    names = self._source.class_names
    return tuple(names[index] for index in self.classes)

  def num_examples(self, split: str) -> int:
    return sum(self.part_sizes(split, 1))

  def part_sizes(self, split: str, process_count: int) -> list[int]:
    return [len(names) for names in self._chosen(split, process_count)]

  def _chosen(self, split: str, process_count: int) -> tuple[tuple[bytes, ...], ...]:
    """The chosen examples' names in each process's part of `split`."""
    return _chosen_names(self._source, split, self.classes, self.examples_per_class,
                         process_count)

  def read(self, split: str, *, process_index: int, process_count: int,
           shuffle_files: bool, seed: Optional[int]):
    """The source's part, only the chosen examples, labels renumbered; and its size."""
    from nfnets_jax.data._tf import tf  # pylint: disable=import-outside-toplevel

    names = self._chosen(split, process_count)[process_index]
    ds, _ = self._source.read(split, process_index=process_index, process_count=process_count,
                              shuffle_files=shuffle_files, seed=seed)
    chosen = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(names or (b"",), tf.string),
                                            tf.constant([1] * len(names) or [0], tf.int32)),
        default_value=0)
    relabel = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(self.classes, tf.int32),
                                            tf.range(len(self.classes), dtype=tf.int32)),
        default_value=-1)
    ds = ds.filter(lambda ex: chosen.lookup(ex["name"]) > 0)
    ds = ds.map(lambda ex: {**ex, "label": relabel.lookup(ex["label"])})
    return ds, len(names)


#: (dataset, data directory, split, classes, N, process count) -> chosen names per part.
_CHOSEN: dict[tuple, tuple[tuple[bytes, ...], ...]] = {}


def _chosen_names(source: Any, split: str, classes: tuple[int, ...],
                  examples_per_class: Optional[int],
                  process_count: int) -> tuple[tuple[bytes, ...], ...]:
  """Chooses over the whole split in stored order, then finds each process's chosen names."""
  key = (source.name, str(source.builder.data_dir), split, classes, examples_per_class,
         process_count)
  if key in _CHOSEN:
    return _CHOSEN[key]
  wanted = set(classes)
  taken = {c: 0 for c in classes}
  order = []
  for name, label in _names_and_labels(source, split, 0, 1):
    if label in wanted and (examples_per_class is None or taken[label] < examples_per_class):
      taken[label] += 1
      order.append(name)
  empty = [c for c, n in taken.items() if n == 0]
  if empty:
    raise ValueError(f"Split {split!r} of dataset {source.name!r} has no example of class(es) "
                     f"{empty}.")
  if process_count == 1:
    parts = [order]
  else:
    chosen = set(order)
    parts = [[name for name, _ in _names_and_labels(source, split, i, process_count)
              if name in chosen] for i in range(process_count)]
  _CHOSEN[key] = tuple(tuple(part) for part in parts)
  return _CHOSEN[key]


def _names_and_labels(source: Any, split: str, process_index: int, process_count: int):
  """(name, label) of every example of one process's part, in stored order."""
  ds, _ = source.read(split, process_index=process_index, process_count=process_count,
                      shuffle_files=False, seed=None)
  ds = ds.map(lambda ex: (ex["name"], ex["label"]))
  for name, label in ds.as_numpy_iterator():
    yield bytes(name), int(label)
