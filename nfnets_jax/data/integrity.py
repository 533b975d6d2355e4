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
folder datasets the pipeline also drops such elements with tf.data's
`ignore_errors`, which logs the decoder's message (but cannot name the file).
"""

import logging
import threading

from nfnets_jax.data._tf import tf

_log = logging.getLogger(__name__)

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_TAIL_BYTES = 64  # Some encoders pad after the JPEG end marker.


def _starts_with(data: tf.Tensor, prefix: bytes) -> tf.Tensor:
  return tf.equal(tf.strings.substr(data, 0, len(prefix)), prefix)


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
                                                 tf.equal(tf.strings.substr(data, 8, 4), b"WEBP"))]))
  return tf.reduce_any(tf.stack([jpeg, png, other]))


class SkippedFiles:
  """The corrupt files met so far (each logged and listed once; thread-safe)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._names: list[str] = []
    self._seen: set[str] = set()

  @property
  def names(self) -> list[str]:
    with self._lock:
      return list(self._names)

  def __len__(self) -> int:
    with self._lock:
      return len(self._names)

  def report(self, name: str) -> None:
    with self._lock:
      if name in self._seen:
        return
      self._seen.add(name)
      self._names.append(name)
      count = len(self._names)
    _log.warning("Skipping corrupt or unreadable image %s (%d skipped so far).", name, count)

  def _report_tensor(self, name: tf.Tensor) -> bool:
    self.report(name.numpy().decode("utf-8", errors="replace"))
    return False

  def keep(self, image_bytes: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
    """A `filter` predicate: True for plausible images; reports and drops the rest."""
    return tf.cond(looks_like_image(image_bytes), lambda: tf.constant(True),
                   lambda: tf.reshape(tf.py_function(self._report_tensor, [name], tf.bool), []))
