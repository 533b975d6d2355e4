"""Skipping corrupt image files without stopping a run.

A folder of user images may hold a truncated download or a non-image with an
image extension. TensorFlow's decoders fail the whole iterator on such a file,
and graph code cannot catch the error, so files are checked *before* decoding
with cheap structural tests on their bytes (magic number, and for JPEG/PNG the
end-of-image marker that truncation removes). A file that fails is dropped,
counted and logged by name once. Prepared TFDS datasets were validated when
they were written, but the check is cheap enough (a few byte compares) to run
everywhere.

Damage that keeps both markers intact can still make a decoder fail; for
folder datasets the pipeline decodes each example inside a guard of its own
(`pipeline.py`) and reports the files whose decoding failed here too, by name.

A split none of whose files can be read would make an endless training stream
wait forever for its first example; `SkippedFiles` knows how many files the
stream holds and, once every one of them was skipped, raises
`UnreadableSplitError` naming them instead.
"""

import logging
import threading
from typing import Any, Callable, Optional

from nfnets_jax.data._tf import tf

_log = logging.getLogger(__name__)

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_TAIL_BYTES = 64  # Some encoders pad after the JPEG end marker.


#: Files named in full in `UnreadableSplitError`; the rest are counted.
NAMED_IN_ERROR = 10


class UnreadableSplitError(ValueError):
  """No file of a split (this process's part of it) could be read as an image."""


def _starts_with(data: tf.Tensor, prefix: bytes, at: int = 0) -> tf.Tensor:
  """Whether `prefix` is at byte `at` (False for data too short: `substr` refuses a
  start past the end, so the start is clamped to the length)."""
  start = tf.minimum(tf.strings.length(data), at)
  return tf.equal(tf.strings.substr(data, start, len(prefix)), prefix)


def _tail_contains(data: tf.Tensor, marker: bytes) -> tf.Tensor:
  """Whether `marker` occurs in the last _TAIL_BYTES bytes (plain byte compares, no regex)."""
  length = tf.strings.length(data)
  start = tf.maximum(length - _TAIL_BYTES, 0)
  tail = tf.strings.substr(data, start, length - start)
  n = len(marker)
  positions = tf.range(tf.maximum(tf.strings.length(tail) - n + 1, 0))
  windows = tf.strings.substr(tf.fill(tf.shape(positions), tail), positions,
                             tf.fill(tf.shape(positions), n))
  return tf.reduce_any(tf.equal(windows, marker))


def looks_like_image(data: tf.Tensor) -> tf.Tensor:
  """A scalar bool: complete JPEG or PNG, or a GIF/BMP/WebP header."""
  jpeg = tf.logical_and(_starts_with(data, _JPEG_START), _tail_contains(data, _JPEG_END))
  png = tf.logical_and(_starts_with(data, _PNG_START), _tail_contains(data, _PNG_END))
  other = tf.reduce_any(tf.stack([_starts_with(data, b"GIF8"), _starts_with(data, b"BM"),
                                  tf.logical_and(_starts_with(data, b"RIFF"),
                                                 _starts_with(data, b"WEBP", at=8))]))
  return tf.reduce_any(tf.stack([jpeg, png, other]))


def attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, tf.Tensor]:
  """Graph code's try/except: `(fn(*args), True)`, or zeros of its output's structure
  (empty strings for strings) and False where `fn` raises, e.g. on a file its decoder
  refuses. A one-element dataset's `ignore_errors` catches the error."""
  tried = tf.data.Dataset.from_tensors(args).map(fn).ignore_errors()
  spec = tried.element_spec
  fallback = tf.nest.map_structure(
      lambda s: tf.zeros([d if d is not None else 0 for d in s.shape], s.dtype), spec)
  out, ok = tried.map(lambda out: (out, tf.constant(True))).concatenate(
      tf.data.Dataset.from_tensors((fallback, tf.constant(False)))).take(1).get_single_element()
  return tf.nest.map_structure(lambda t, s: tf.ensure_shape(t, s.shape), out, spec), ok


class SkippedFiles:
  """The corrupt files met so far (each logged and listed once; thread-safe).

  `total`: how many distinct files the stream reads (None: unknown); when
  every one of them has been skipped, `report` raises `UnreadableSplitError`
  (kept as `error`) saying how many and which, `where` naming the split.
  """

  def __init__(self, total: Optional[int] = None, where: str = "the split") -> None:
    self._lock = threading.Lock()
    self._names: list[str] = []
    self._seen: set[str] = set()
    self._total = total
    self._where = where
    self.error: Optional[UnreadableSplitError] = None

  @property
  def names(self) -> list[str]:
    with self._lock:
      return list(self._names)

  def __len__(self) -> int:
    with self._lock:
      return len(self._names)

  def report(self, name: str) -> None:
    with self._lock:
      if self.error is not None:
        raise self.error
      if name in self._seen:
        return
      self._seen.add(name)
      self._names.append(name)
      count = len(self._names)
      if self._total is not None and count >= self._total:
        self.error = UnreadableSplitError(self._unreadable_message())
    _log.warning("Skipping corrupt or unreadable image %s (%d skipped so far).", name, count)
    if self.error is not None:
      raise self.error

  def _unreadable_message(self) -> str:
    named = ", ".join(self._names[:NAMED_IN_ERROR])
    more = len(self._names) - NAMED_IN_ERROR
    rest = f" and {more} more (each named in a warning above)" if more > 0 else ""
    return (f"None of the {len(self._names)} files of {self._where} could be read as an "
            f"image: {named}{rest}. Expected JPEG, PNG, GIF, BMP or WebP files; replace or "
            "remove these and run again.")

  def _report_tensor(self, name: tf.Tensor) -> bool:
    self.report(name.numpy().decode("utf-8", errors="replace"))
    return False

  def keep(self, image_bytes: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
    """A `filter` predicate: True for plausible images; reports and drops the rest."""
    return self.keep_if(looks_like_image(image_bytes), name)

  def keep_if(self, ok: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
    """A `filter` predicate: True where `ok`; elsewhere reports `name` and drops it."""
    return tf.cond(ok, lambda: tf.constant(True),
                   lambda: tf.reshape(tf.py_function(self._report_tensor, [name], tf.bool), []))
