"""Download the published NFNet ImageNet weights once, verified, into a local cache.

`fetch("F0")` returns the path of `F0_haiku.npz` in the cache, downloading it on
first use from `BASE_URL` and checking its MD5 against the pinned table
`PUBLISHED`. Nothing here opens the file: despite the suffix the published files
are pickles, which `formats.load_file` reads with its restricted unpickler.

Where things live (read at each call; the matching argument of `fetch` wins):

* `$NFNETS_JAX_HOME`: the cache directory, default `~/.cache/nfnets_jax/weights`.
* `$NFNETS_JAX_WEIGHTS_URL`: a mirror to download from instead of `BASE_URL`
  (`<url>/<filename>` is fetched; `file://` URLs work too).
* `$NFNETS_JAX_OFFLINE=1`: never touch the network; a file missing from the cache
  is an error that names the URL and the exact path to put the file at.

Guarantees:

* A file appears under its final name only by `os.replace` of a temporary file
  (in the same directory) whose MD5 matched, so an interrupted or corrupted
  download never looks like a cached one.
* Several processes of one job download a file once: the download runs under a
  file lock next to it (`<cache>/.<filename>.lock`); a process that waited finds
  the file and returns it.
* A file already in the cache (also one put there by hand, as the offline error
  suggests) is hashed once per process, keyed by its path, size and modification
  time, so a hand-placed wrong file is caught and repeated calls stay cheap.

Every failure raises a `WeightsError` subclass whose message says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import pathlib
import sys
import tempfile
import urllib.error
import urllib.request
from typing import BinaryIO, Mapping, Optional

BASE_URL = "https://storage.googleapis.com/dm-nfnets"
DEFAULT_CACHE_DIR = "~/.cache/nfnets_jax/weights"
HOME_ENV = "NFNETS_JAX_HOME"
URL_ENV = "NFNETS_JAX_WEIGHTS_URL"
OFFLINE_ENV = "NFNETS_JAX_OFFLINE"
# Seconds a connection attempt or a single read may stall before it counts as a
# network failure (not a limit on the whole download).
TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class PublishedFile:
  """One downloadable weight file: its variant name, file name, MD5 and the
  ImageNet top-1 accuracy (percent) published with it."""
  variant: str
  filename: str
  md5: str
  imagenet_top1: float


def _published(variant: str, md5: str, top1: float) -> PublishedFile:
  return PublishedFile(variant, f"{variant}_haiku.npz", md5, top1)


# The MD5 sums come from another port's table, not from DeepMind; `fetch` checks
# every download against them, so a wrong entry shows up on first download as a
# ChecksumError rather than as silently different weights. F6 is the SAM-trained
# model (86.5 is "F6+SAM" in the paper).
PUBLISHED: Mapping[str, PublishedFile] = {
    f.variant: f for f in (
        _published("F0", "0a41039da1cb43adf47f1b7d86ddfe0f", 83.6),
        _published("F1", "c9126bbfaf855f9ddb7ff3b902558781", 84.7),
        _published("F2", "7a018d8d1498020e2f5a8719a1e7f53f", 85.1),
        _published("F3", "d8e1e78d26db659c486150dbaccbe78a", 85.7),
        _published("F4", "f5974a7e3388aa81b91a9f1403e759a4", 85.9),
        _published("F5", "8639e925de951030651ac775b9f915c3", 86.0),
        _published("F6", "b16cca40ac1ecec2bd5e3273866da0c1", 86.5),
    )
}


class WeightsError(RuntimeError):
  """Base class of every error raised here."""


class UnknownVariantError(WeightsError):
  """The variant is not in the table."""


class OfflineError(WeightsError):
  """The file is not cached and the network is forbidden or unreachable."""


class DownloadError(WeightsError):
  """The server answered, but not with the file (e.g. HTTP 404)."""


class IncompleteDownloadError(WeightsError):
  """The connection ended before the whole body arrived."""


class ChecksumError(WeightsError):
  """The bytes do not have the pinned MD5."""


class CacheDirError(WeightsError):
  """The cache directory cannot be created or written (permissions, full disk)."""


# ((path, size, mtime_ns), md5) of cached files this process has hashed and found right.
_verified: set = set()


def lookup(variant: str, table: Mapping[str, PublishedFile] = PUBLISHED) -> PublishedFile:
  """The table's entry for `variant`, or UnknownVariantError listing the valid names."""
  try:
    return table[variant]
  except KeyError:
    raise UnknownVariantError(
        f"unknown pretrained variant {variant!r}; choose one of {', '.join(sorted(table))}"
    ) from None


def resolve_cache_dir(cache_dir: Optional[os.PathLike | str] = None) -> pathlib.Path:
  """`cache_dir`, else `$NFNETS_JAX_HOME`, else `~/.cache/nfnets_jax/weights`."""
  chosen = cache_dir if cache_dir is not None else (os.environ.get(HOME_ENV) or DEFAULT_CACHE_DIR)
  return pathlib.Path(chosen).expanduser()


def resolve_base_url(base_url: Optional[str] = None) -> str:
  """`base_url`, else `$NFNETS_JAX_WEIGHTS_URL`, else `BASE_URL`; no trailing slash."""
  chosen = base_url if base_url is not None else (os.environ.get(URL_ENV) or BASE_URL)
  return chosen.rstrip("/")


def resolve_offline(offline: Optional[bool] = None) -> bool:
  """`offline`, else whether `$NFNETS_JAX_OFFLINE` is set to a true value."""
  if offline is not None:
    return bool(offline)
  value = os.environ.get(OFFLINE_ENV, "").strip().lower()
  if value in _TRUE:
    return True
  if value in _FALSE:
    return False
  raise WeightsError(f"${OFFLINE_ENV}={os.environ[OFFLINE_ENV]!r} is not a boolean; "
                     f"set it to 1 (no network) or 0, or unset it")


def url_for(variant: str, *, table: Mapping[str, PublishedFile] = PUBLISHED,
            base_url: Optional[str] = None) -> str:
  """The URL `fetch` downloads `variant` from."""
  return f"{resolve_base_url(base_url)}/{lookup(variant, table).filename}"


def cache_path(variant: str, *, table: Mapping[str, PublishedFile] = PUBLISHED,
               cache_dir: Optional[os.PathLike | str] = None) -> pathlib.Path:
  """Where `fetch` keeps `variant` (whether or not it is there yet)."""
  return resolve_cache_dir(cache_dir) / lookup(variant, table).filename


def fetch(variant: str, *, table: Mapping[str, PublishedFile] = PUBLISHED,
          cache_dir: Optional[os.PathLike | str] = None, base_url: Optional[str] = None,
          offline: Optional[bool] = None, progress: bool = True) -> pathlib.Path:
  """The path of `variant`'s file in the cache, downloaded and verified if missing.

  `table` maps variant names to files (the pinned `PUBLISHED` by default; tests
  pass their own). `cache_dir`, `base_url` and `offline` override the environment
  variables described in the module docstring. `progress` shows a tqdm bar on
  stderr while downloading (tqdm hides it when stderr is not a terminal). A
  process that finds another one downloading the same file says so on stderr,
  waits for it, and returns the file it wrote.

  Raises UnknownVariantError, OfflineError, DownloadError,
  IncompleteDownloadError, ChecksumError or CacheDirError (all WeightsError).
  """
  entry = lookup(variant, table)
  path = cache_path(variant, table=table, cache_dir=cache_dir)
  url = url_for(variant, table=table, base_url=base_url)
  if path.exists():
    return _verified_cached(path, entry)
  if resolve_offline(offline):
    raise _offline_error(url, path, f"${OFFLINE_ENV} is set" if offline is None else "offline=True")
  _make_dir(path.parent)
  with _download_lock(path):
    if not path.exists():  # Another process may have finished while this one waited.
      _download(url, path, entry, progress)
  return _verified_cached(path, entry)


def _verified_cached(path: pathlib.Path, entry: PublishedFile) -> pathlib.Path:
  """`path` once its MD5 matches `entry` (hashed once per process per file version)."""
  if (_version(path), entry.md5) in _verified:
    return path
  actual = _md5_of_file(path)
  if actual != entry.md5:
    raise ChecksumError(
        f"cached file {path} has MD5 {actual}, expected {entry.md5} for {entry.variant}; "
        f"delete it and call again to download a fresh copy (or put the right file there)")
  _remember(path, entry.md5)
  return path


def _version(path: pathlib.Path) -> tuple:
  stat = path.stat()
  return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _remember(path: pathlib.Path, md5: str) -> None:
  """Mark `path`, as it is now, as having `md5` for the rest of this process."""
  _verified.add((_version(path), md5))


def _md5_of_file(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "md5").hexdigest()


def _offline_error(url: str, path: pathlib.Path, reason: str) -> OfflineError:
  return OfflineError(f"cannot download {url} ({reason}); download it by hand and put it at {path}")


def _cache_dir_error(directory: pathlib.Path, err: OSError) -> CacheDirError:
  return CacheDirError(
      f"cannot write the weights cache {directory}: {err.strerror or err}; free space or fix "
      f"its permissions, or set ${HOME_ENV} (or cache_dir=) to a writable directory")


def _make_dir(directory: pathlib.Path) -> None:
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise _cache_dir_error(directory, err) from err


class _download_lock:
  """The inter-process lock `<dir>/.<filename>.lock`; says on stderr when it waits."""

  def __init__(self, path: pathlib.Path):
    import filelock  # Imported here: only downloading needs it.
    self._path = path
    self._lock = filelock.FileLock(path.parent / f".{path.name}.lock")
    self._timeout = filelock.Timeout

  def __enter__(self):
    try:
      try:
        self._lock.acquire(timeout=0)
      except self._timeout:
        print(f"Waiting for another process to download {self._path} ...", file=sys.stderr)
        self._lock.acquire()
    except OSError as err:
      raise _cache_dir_error(self._path.parent, err) from err
    return self

  def __exit__(self, *exc_info):
    self._lock.release()


def _download(url: str, path: pathlib.Path, entry: PublishedFile, progress: bool) -> None:
  """Download `url` to a temporary file beside `path`, verify it, rename it to `path`.
  The temporary file is removed whatever goes wrong."""
  with contextlib.ExitStack() as stack:
    response = stack.enter_context(_open(url, path))
    tmp = stack.enter_context(_temporary_file(path))
    stack.callback(_remove_if_present, tmp.name)
    actual = _copy(response, tmp, url, path, progress)
    if actual != entry.md5:
      raise ChecksumError(
          f"download of {url} has MD5 {actual}, expected {entry.md5}; the partial file was "
          f"deleted. Call again to retry; if it repeats, the server sends a different file")
    try:
      os.fsync(tmp.fileno())  # The bytes are on disk before the name says "complete".
      tmp.close()
      os.replace(tmp.name, path)
    except OSError as err:
      raise _cache_dir_error(path.parent, err) from err
  _remember(path, entry.md5)


def _remove_if_present(name: str) -> None:
  try:
    os.unlink(name)
  except FileNotFoundError:
    pass


def _open(url: str, path: pathlib.Path):
  """The HTTP response for `url`; network failures become OfflineError."""
  try:
    return urllib.request.urlopen(url, timeout=TIMEOUT_S)
  except urllib.error.HTTPError as err:
    raise DownloadError(f"{url} answered HTTP {err.code} ({err.reason}); check the URL "
                        f"(${URL_ENV} or base_url=) or put the file at {path} by hand") from err
  except (urllib.error.URLError, OSError) as err:  # Refused, unreachable, DNS, timeout.
    reason = getattr(err, "reason", None) or err
    raise _offline_error(url, path, f"network error: {reason}") from err


def _temporary_file(path: pathlib.Path) -> BinaryIO:
  try:
    return tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                       suffix=".part", delete=False)
  except OSError as err:
    raise _cache_dir_error(path.parent, err) from err


def _copy(response, out: BinaryIO, url: str, path: pathlib.Path, progress: bool) -> str:
  """Stream the body into `out`; its MD5. A body shorter than its Content-Length
  (or cut by a network error) raises IncompleteDownloadError."""
  from tqdm import tqdm  # Imported here: only downloading needs it.
  length = response.headers.get("Content-Length")
  expected = int(length) if length is not None else None
  digest = hashlib.md5()
  received = 0
  with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
            file=sys.stderr, disable=None if progress else True, leave=False) as bar:
    while chunk := _read(response, url, received, expected):
      digest.update(chunk)
      _write(out, chunk, path)
      received += len(chunk)
      bar.update(len(chunk))
  if expected is not None and received != expected:
    raise _interrupted(url, received, expected, "the connection closed early")
  return digest.hexdigest()


def _read(response, url: str, received: int, expected: Optional[int]) -> bytes:
  try:
    return response.read(_CHUNK)
  except (http.client.HTTPException, OSError) as err:
    raise _interrupted(url, received, expected, f"{type(err).__name__}: {err}") from err


def _write(out: BinaryIO, chunk: bytes, path: pathlib.Path) -> None:
  try:
    out.write(chunk)
  except OSError as err:
    raise _cache_dir_error(path.parent, err) from err


def _interrupted(url: str, received: int, expected: Optional[int],
                 why: str) -> IncompleteDownloadError:
  total = f" of {expected}" if expected is not None else ""
  return IncompleteDownloadError(
      f"download of {url} was interrupted after {received}{total} bytes ({why}); the partial "
      f"file was deleted. Call again to retry")
